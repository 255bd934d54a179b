import json

import numpy as np
import pytest

from musefm.data.dataset import open_dataset
from musefm.errors import MusefmError
from musefm.recipes.embed import MAPS, EmbedConfig, main as embed, pca_2d
from tests.test_finetune import QUIET, styles  # noqa: F401  (the module fixture: datasets + backbones)


@pytest.mark.parametrize("family,data", [("bert", "octuple"), ("lm", "remi")])
def test_embed_a_dataset_writes_one_vector_per_piece(styles, family, data, tmp_path, one_thread):  # noqa: F811
    out = tmp_path / "emb"
    summary = embed(EmbedConfig(model=str(styles[family]), source=str(styles[data]), out=str(out), per_bar=True,
                                seq_len=32, color_by="collection"), stream=QUIET)
    manifest = open_dataset(styles[data]).manifest
    vectors = np.load(out / "embeddings.npy")
    assert vectors.shape == (len(manifest), 32) and vectors.dtype == np.float32 and np.isfinite(vectors).all()
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [entry["id"] for entry in index] == [row["id"] for row in manifest]
    assert {entry["collection"] for entry in index} == {"bach-like", "folk-like"}
    bars = np.load(out / "bars.npy")
    bar_rows = [json.loads(line) for line in (out / "bars.jsonl").read_text().splitlines()]
    # Each piece is 40 quarter notes in 4/4: 10 bars, each embedded once.
    assert bars.shape == (10 * len(manifest), 32) and len(bar_rows) == len(bars)
    assert [r["bar"] for r in bar_rows if r["piece"] == 0] == list(range(10))
    assert (out / "map.png").stat().st_size > 0 and summary["pieces"] == len(manifest)


def test_embed_a_folder_of_files_matches_its_dataset(styles, tmp_path, one_thread):  # noqa: F811
    from_files = embed(EmbedConfig(model=str(styles["bert"]), source=str(styles["root"]), out=str(tmp_path / "a"),
                                   seq_len=32, map="none"), stream=QUIET)
    assert from_files["pieces"] == 16 and not (tmp_path / "a" / "map.png").exists()
    embed(EmbedConfig(model=str(styles["bert"]), source=str(styles["octuple"]), out=str(tmp_path / "b"), seq_len=32,
                      map="none"), stream=QUIET)
    by_path = lambda folder: {json.loads(line)["path"]: vector for line, vector in  # noqa: E731
                              zip((folder / "index.jsonl").read_text().splitlines(), np.load(folder / "embeddings.npy"))}
    files, dataset = by_path(tmp_path / "a"), by_path(tmp_path / "b")
    assert files.keys() == dataset.keys()
    for path in files:
        np.testing.assert_allclose(files[path], dataset[path], rtol=1e-5, atol=1e-5)


def test_pca_finds_the_main_axis():
    rng = np.random.default_rng(0)
    points = np.outer(rng.normal(size=50), [3.0, 4.0, 0.0]) + 0.01 * rng.normal(size=(50, 3))
    coordinates = pca_2d(points)
    assert coordinates.shape == (50, 2)
    assert abs(np.corrcoef(coordinates[:, 0], points @ np.array([0.6, 0.8, 0.0]))[0, 1]) > 0.999


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_nonlinear_maps_keep_separate_clusters_apart(method):
    """Two well-separated 16-D clusters stay two clusters on the 2-D map (and the map is seeded)."""
    rng = np.random.default_rng(0)
    centres = np.zeros((2, 16))
    centres[1, :] = 6.0
    labels = np.repeat([0, 1], 20)
    points = centres[labels] + rng.normal(size=(40, 16))
    coordinates = MAPS[method](points)
    assert coordinates.shape == (40, 2) and np.isfinite(coordinates).all()
    # Every point's nearest neighbour on the map belongs to its own cluster.
    distances = np.linalg.norm(coordinates[:, None] - coordinates[None], axis=-1) + np.eye(40) * 1e9
    assert (labels[distances.argmin(axis=1)] == labels).all()
    np.testing.assert_allclose(MAPS[method](points), coordinates, atol=1e-4)


def test_embed_refuses_bad_settings(styles, tmp_path):  # noqa: F811
    with pytest.raises(MusefmError, match="map"):
        EmbedConfig(map="mds").validate()
    with pytest.raises(MusefmError, match="color_by"):
        EmbedConfig(color_by="mood").validate()
    with pytest.raises(MusefmError, match="tokenizer differs"):
        embed(EmbedConfig(model=str(styles["lm"]), source=str(styles["octuple"]), out=str(tmp_path / "x")),
              stream=QUIET)
