"""PCA hash: a cheap perceptual code per image, and exact near-duplicate search over the codes.

An image becomes a 143-number vector (low DCT frequencies of a 32x32 grey thumbnail of the
picture inside any uniform frame, after a brightness-invariant tone curve: `features`), the vector
is projected on a PCA basis fitted on a sample of the job, rotated by ITQ and cut at zero into 64
bits (`basis`). Two images whose codes are within a Hamming radius are near duplicates;
`search.pca_hash_groups` joins them into connected components and keeps one representative per
group (`curate.stages.dedup.grouping`). `features.phash_codes` puts imagededup's PHash in the
same packed layout, so `--hash phash` reuses all of the search and grouping.

The pair search is exact at every scale: a blocked brute-force faiss range search for small
inputs, and above `EXACT_BELOW` codes a multi-index search whose tables are chosen so that every
pair within the radius collides exactly in at least one of them (`tables`). Each table is one sort
of the codes, so the work is O(tables * N log N) and the tables are independent units that a Ray
pipeline can fan out; nothing here needs all pairs of a billion images at once. `codes` holds the
packed-code primitives both search paths share.

The defaults in each module were measured on the demo corpus (357 originals of
`generate_demo(count=400)`, nine edits of each: resize 50%, JPEG q30, WebP q75, brightness and
contrast +-30%, Gaussian blur 2 px, greyscale), with the basis fitted on another demo corpus
(count 2000, seed 2), so that the images were unseen by the fit, as most of a large job is by its
fitting sample.
"""
