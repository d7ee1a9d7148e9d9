"""Seed sets: the policy grammar, the presets, the registry and its errors."""

import pytest

from curate.catalog import Catalog, CatalogError
from curate.stages.retrieve.seed_sets import (
    PRESETS,
    PolicyStep,
    SeedSetError,
    format_policy,
    parse_policy,
    registration,
    resolve_seed_sets,
)
from pipelines.recipes import RecipeError, load_recipe, merge, recipe_names
from schemas.job import parse_job_spec


def test_policy_grammar_round_trips():
    steps = parse_policy("as-is + knn:4+cluster:10000+balanced:500")
    assert steps == (
        PolicyStep("as-is"),
        PolicyStep("knn", 4),
        PolicyStep("cluster", 10000),
        PolicyStep("balanced", 500),
    )
    assert format_policy(steps) == "as-is+knn:4+cluster:10000+balanced:500"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("knn", "needs a positive K"),
        ("knn:0", "needs a positive K"),
        ("as-is:3", "takes no number"),
        ("nearest:4", "expected as-is, knn:K"),
        ("knn:4+knn:8", "names knn twice"),
        ("", "expected as-is"),
    ],
)
def test_bad_policies_say_what_is_wrong(text, says):
    with pytest.raises(SeedSetError, match=says):
        parse_policy(text)


def test_presets_follow_the_dinov2_recipe():
    # DINOv2 Table 15: ImageNet-22k whole plus k=4, ImageNet-1k k=32, small sets by cluster.
    assert PRESETS["imagenet22k"].policy == "as-is+knn:4"
    assert PRESETS["imagenet1k"].policy == "knn:32"
    assert PRESETS["gldv2"].policy == "as-is+knn:4"
    assert PRESETS["mapillary-sls"].policy == "as-is"
    assert PRESETS["flowers102"].policy == "cluster:10000"
    assert PRESETS["flowers102"].cap == 1_000_000
    for preset in PRESETS.values():
        parse_policy(preset.policy)


def test_registration_fills_presets_and_needs_a_policy_otherwise():
    assert registration("imagenet22k", " /data/in22k ", None, None) == (
        "/data/in22k",
        "as-is+knn:4",
        None,
    )
    assert registration("flowers102", "/f", None, None)[2] == 1_000_000
    # A user's own policy on a preset name drops the preset's cap unless given.
    assert registration("flowers102", "/f", "knn:2", None) == ("/f", "knn:2", None)
    with pytest.raises(SeedSetError, match="not a preset"):
        registration("mine", "/m", None, None)
    with pytest.raises(SeedSetError, match="not a set name"):
        registration("Bad Name", "/m", "knn:1", None)
    with pytest.raises(SeedSetError, match="cap must be positive"):
        registration("mine", "/m", "knn:1", 0)


def test_resolving_names_gives_the_command_that_fixes_it():
    registered = {"mine": {"location": "/m", "policy": "knn:2", "cap": None}}
    (resolved,) = resolve_seed_sets(["mine"], registered)
    assert resolved.policy == (PolicyStep("knn", 2),) and resolved.location == "/m"
    with pytest.raises(SeedSetError, match="curate seeds add imagenet22k /path/to/imagenet22k"):
        resolve_seed_sets(["imagenet22k"], registered)
    with pytest.raises(SeedSetError, match="unknown seed set 'nope'.*curate seeds add nope"):
        resolve_seed_sets(["nope"], registered)


def test_catalog_registry_keeps_registrations_unless_replaced(tmp_path):
    catalog = Catalog(tmp_path / "c.duckdb", tmp_path)
    catalog.add_seed_set("mine", "/m", "knn:2", None)
    first = catalog.seed_sets()["mine"]
    catalog.add_seed_set("mine", "/m", "knn:2", None)  # the same again: nothing changes
    assert catalog.seed_sets()["mine"] == first
    with pytest.raises(CatalogError, match="--replace"):
        catalog.add_seed_set("mine", "/other", "knn:2", None)
    catalog.add_seed_set("mine", "/other", "cluster:5", 10, replace=True)
    assert catalog.seed_sets()["mine"]["location"] == "/other"
    assert catalog.seed_sets()["mine"]["cap"] == 10


def test_job_spec_needs_seeds_for_retrieval_and_defaults_to_clustering_without():
    assert parse_job_spec({"source": "x"}).stages()[-1] == "cluster"
    assert parse_job_spec({"source": "x", "seeds": ["a"]}).stages()[-1] == "curated"
    with pytest.raises(ValueError, match="needs seed sets"):
        parse_job_spec({"source": "x", "until": "curated"})


def test_recipes_load_and_merge():
    assert {"demo", "lvd"} <= set(recipe_names())
    lvd = parse_job_spec({"source": "x", **load_recipe("lvd")})
    assert lvd.cluster.n_clusters == 100_000 and lvd.dedup.copy_threshold == 0.6
    assert lvd.embed.arch == "vit_huge_patch14_224"
    demo = load_recipe("demo")
    merged = merge(demo, {"embed": {"batch_size": 8}})
    assert merged["embed"]["arch"] == demo["embed"]["arch"] and merged["embed"]["batch_size"] == 8
    with pytest.raises(RecipeError, match="no recipe 'nope'"):
        load_recipe("nope")


def test_bad_recipe_files_are_refused(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(str(tmp_path / "list.yaml"))
    (tmp_path / "src.yaml").write_text("source: /x\n")
    with pytest.raises(RecipeError, match="belongs to the run"):
        load_recipe(str(tmp_path / "src.yaml"))
