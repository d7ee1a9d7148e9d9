"""copybench.md from the results of bench/copybench/run.py."""

from measuring import code_line, met

from curate.copy_model.edits import EDITS, FAMILIES

_NAMES = {
    "phash": "PHash (imagededup)",
    "dhash": "DHash (imagededup)",
    "pca_hash": "our hash pass",
    "copy_model": "our copy model",
    "combined": "hash + copy model (the dedup stage)",
}


def _f(value, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _methods_table(scores: dict) -> list[str]:
    present = [m for m in _NAMES if m in scores]
    lines = [
        "| method | pair precision | easy-edit recall | "
        + " | ".join(f"{f} recall" for f in FAMILIES)
        + " | distinct images wrongly merged | predicted pairs (true) | seconds |",
        "|---|" + "---:|" * (len(FAMILIES) + 6),
    ]
    for m in present:
        s = scores[m]
        family = s["per_family_recall"]
        lines.append(
            f"| {_NAMES[m]} | {_f(s['pair_precision'])} | {_f(s['easy_recall'])} | "
            + " | ".join(_f(family.get(f)) for f in FAMILIES)
            + f" | {s['wrongly_merged']} | {s['predicted_pairs']} ({s['true_pairs_found']}) | "
            f"{_f(s.get('seconds'), 1)} |"
        )
    return lines


def _edits_table(scores: dict) -> list[str]:
    present = [m for m in _NAMES if m in scores]
    lines = [
        "| edit | family | " + " | ".join(_NAMES[m] for m in present) + " |",
        "|---|---|" + "---:|" * len(present),
    ]
    for edit in EDITS:
        row = [_f(scores[m]["per_edit_recall"].get(edit.name)) for m in present]
        lines.append(f"| {edit.name} | {edit.family} | " + " | ".join(row) + " |")
    return lines


def _curve_table(points: list[dict], marked: float) -> list[str]:
    lines = [
        "| cosine threshold | pair precision | raw-pair precision | easy-edit recall | "
        "hard-geometric recall | wrongly merged |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in points:
        # Every 0.05 below 0.9, every 0.01 above (where a briefly trained model's copies are).
        hundredths = p["threshold"] * 100
        whole = abs(hundredths - round(hundredths)) < 1e-6
        on_grid = whole and (round(hundredths) % 5 == 0 or p["threshold"] >= 0.9)
        if not (on_grid or abs(p["threshold"] - marked) < 1e-9):
            continue
        mark = " **(operating point)**" if abs(p["threshold"] - marked) < 1e-9 else ""
        lines.append(
            f"| {p['threshold']:.2f}{mark} | {_f(p['pair_precision'])} | "
            f"{_f(p['edge_precision'])} | {_f(p['easy_recall'])} | "
            f"{_f(p['hard_geometric_recall'])} | {p['wrongly_merged']} |"
        )
    return lines


def _targets(result: dict) -> list[str]:
    targets, rows = result["targets"], []
    for split in ("tune", "heldout"):
        ours, phash = result[split]["pca_hash"], result[split]["phash"]
        rows += [
            (
                f"hash pass pair precision ({split})",
                _f(ours["pair_precision"]),
                f"≥ {targets['hash pair precision']}",
                ours["pair_precision"] >= targets["hash pair precision"],
            ),
            (
                f"hash pass easy-edit recall ({split})",
                _f(ours["easy_recall"], 4),
                f"≥ PHash's {_f(phash['easy_recall'], 4)}",
                ours["easy_recall"] >= phash["easy_recall"],
            ),
            (
                f"hash pass wrongly merged ({split})",
                str(ours["wrongly_merged"]),
                f"< PHash's {phash['wrongly_merged']}",
                ours["wrongly_merged"] < phash["wrongly_merged"],
            ),
        ]
    held = result["heldout"]
    rows.append(
        (
            "PHash hard-geometric recall (held-out)",
            _f(held["phash"]["hard_geometric_recall"]),
            f"< {targets['PHash hard-geometric recall below']}",
            held["phash"]["hard_geometric_recall"] < targets["PHash hard-geometric recall below"],
        )
    )
    if "combined" in held:
        c = held["combined"]
        minutes = result["copy_model"]["made"].get("minutes", 0.0)
        rows += [
            (
                "combined pair precision (held-out)",
                _f(c["pair_precision"]),
                f"≥ {targets['combined pair precision']}",
                c["pair_precision"] >= targets["combined pair precision"],
            ),
            (
                "combined hard-geometric recall (held-out)",
                _f(c["hard_geometric_recall"]),
                f"≥ {targets['combined hard-geometric recall']}",
                c["hard_geometric_recall"] >= targets["combined hard-geometric recall"],
            ),
            (
                "combined easy-edit recall (held-out)",
                _f(c["easy_recall"]),
                f"≥ {targets['combined easy-edit recall']}",
                c["easy_recall"] >= targets["combined easy-edit recall"],
            ),
            (
                "copy-model training minutes",
                f"{minutes:.1f}",
                f"≤ {targets['training minutes at most']:g}",
                # The budget ends the run at the step that reaches it: to the tenth of a minute.
                round(minutes, 1) <= targets["training minutes at most"],
            ),
        ]
    lines = ["| target | value | goal | met |", "|---|---:|---|---|"]
    lines += [f"| {name} | {value} | {goal} | {met(ok)} |" for name, value, goal, ok in rows]
    return lines


def len_note(scores: dict) -> str:
    """The scaled threshold's own account of itself."""
    return scores["threshold_source"]


def markdown(result: dict) -> str:
    m, b = result["machine"], result["build"]
    held, tune = b["splits"]["heldout"], b["splits"]["tune"]
    lines = [
        f"# Copy detection on real images: copybench, {m['cpus']} CPUs",
        "",
        f"{m['platform']}. Load average {m['load_before']:.1f} before, "
        f"{m.get('load_after', 0):.1f} after (a shared machine); whole run "
        f"{result['wall_s'] / 60:.1f} min. {code_line(result['code'])}",
        "",
        "Originals are real photographs and artwork from Debian's image packages (wallpapers, "
        "paper textures, openclipart, the photographs and paintings of gcompris), selected and "
        "split by `bench/copybench/build.py`; every edited original has 14 copies in four "
        "families, and the other originals of the same topics are the hard negatives. "
        f"Build `{b['folder']}`: tune split {tune['originals']} originals "
        f"({tune['photographs']} photographs, {tune['artwork']} artwork, {tune['categories']} "
        f"topics), {tune['edited_originals']} edited, {tune['files']} files; held-out split "
        f"{held['originals']} originals ({held['photographs']} photographs, {held['artwork']} "
        f"artwork), {held['edited_originals']} edited, {held['files']} files; training pool "
        f"{b['pool']} pictures. Easy edits: photometric and re-encoding. imagededup's CNN: "
        f"{result['imagededup_cnn']}.",
        "",
        "Scores are on the groups each method forms (connected components of its pairs): pair "
        "precision over the pairs inside groups, recall as the share of an edit's files grouped "
        "with their original, and the distinct originals that share a group with another "
        "original's file.",
        "",
        "## Targets",
        "",
        *_targets(result),
    ]
    for split, title in (("heldout", "Held-out split (confirmation)"), ("tune", "Tune split")):
        scores = result[split]
        ours = scores["pca_hash"]
        lines += [
            "",
            f"## {title}",
            "",
            f"Our hash pass as the dedup stage runs it by default: {ours['bits']}-bit PCA-hash "
            f"codes fitted on the split, pairs within Hamming {ours['radius']} (candidates within "
            f"{ours['word_radius']} on either 64-bit word). imagededup at its default threshold "
            "(10) through its own find_duplicates.",
            "",
            *_methods_table(scores),
            "",
            "Recall per edit:",
            "",
            *_edits_table(scores),
        ]
    if "copy_model" in result:
        made, cal = result["copy_model"]["made"], result["copy_model"]["calibration"]
        copy = result["heldout"]["copy_model"]
        at = cal["at_copy_threshold"]
        lines += [
            "",
            "## The copy model",
            "",
            f"`curate copy-model train`'s code: {made['arch']}, GeM, 512-d, "
            f"{made['input_size']} px inputs, {made['recipe']}; {made['images']} images (the "
            "tune split's originals and "
            f"the training pool, never the held-out split), {made['steps']} steps of "
            f"{made['batch_size']} images in **{made['minutes']:.1f} min of training** on "
            f"{made['device']} (final loss {made['final_loss']:.3f})"
            + (
                " — reused from an earlier run of the same images and settings"
                if result["copy_model"]["reused"]
                else ""
            )
            + ".",
            "",
            f"Calibrated on the tune split ({cal['images']} files, "
            f"{cal['distractor_pairs']:,} pairs of distinct pictures): pair precision reaches "
            f"{cal['precision_target']} at cosine {cal['copy_threshold']:.4f} (there "
            f"{_f(at['pair_precision'])}, easy-edit recall {_f(at['easy_recall'])}, "
            f"hard-geometric recall {_f(at['hard_geometric_recall'])}), and the false-match rate "
            "per pair is stored at every threshold. A job runs the model at that point, raised "
            "when it compares more images than the calibration set to the lowest cosine whose "
            "rate keeps the calibration's false pairs per image: on the held-out split "
            f"**{copy['threshold']:.4f}** ({len_note(copy)}), alone and after the hash pass "
            "(the copy pass compares every file). Held-out curve (the model alone; the bold "
            "row is its operating point):",
            "",
            *_curve_table(result["heldout"]["curve"], copy["threshold"]),
        ]
    return "\n".join(lines) + "\n"
