"""``musefm embed``: one vector per piece (and optionally per bar) from a pretrained model, and a map.

    musefm embed --model runs/bert --source data/mix --out emb/ [--per-bar] [--map pca] [--color-by composer]

The source is a dataset directory (built with the model's tokenizer) or a corpus spec
(``dir:folder``, ``music21:bach``), which is read and encoded with the model's tokenizer. A piece's
vector is the mean of its windows' pooled states (the same consecutive windows as ``predict``).
Per-bar vectors are the mean hidden state of each bar's tokens, taken from the window that holds
them (each token is read once, in the window where it first appears).

Output: ``embeddings.npy`` (N, D) float32, ``index.jsonl`` (row i: id and metadata of piece i),
``bars.npy`` (M, D) + ``bars.jsonl`` (piece row, bar number) with ``per_bar``, and ``map.png``
(a 2-D map coloured by a metadata field): PCA (numpy's SVD), t-SNE (scikit-learn) or UMAP (umap-learn).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from musefm.errors import BadInputError, MusefmError

INDEX_FIELDS = ("id", "path", "collection", "composer", "title", "key", "time_signature", "split")


@dataclass
class EmbedConfig:
    model: str = ""  # pretrained model or run directory (music-bert or music-lm)
    source: str = ""  # dataset directory or corpus spec
    out: str = ""
    pooling: Literal["mean", "first", "last"] = "mean"
    per_bar: bool = False
    map: Literal["pca", "tsne", "umap", "none"] = "pca"
    color_by: str = "collection"  # index field the map is coloured by
    seq_len: int = 0  # 0 = the model's max_seq_len
    batch_size: int = 16

    def validate(self) -> None:
        if self.pooling not in ("mean", "first", "last"):
            raise MusefmError(f"pooling: must be 'mean', 'first' or 'last', got {self.pooling!r}")
        if self.map not in MAPS and self.map != "none":
            raise MusefmError(f"map: must be {', '.join(MAPS)} or none, got {self.map!r}")
        if self.color_by not in INDEX_FIELDS:
            raise MusefmError(f"color_by: must be one of {', '.join(INDEX_FIELDS)}, got {self.color_by!r}")
        if self.seq_len < 0 or self.batch_size < 1:
            raise MusefmError("seq_len must be >= 0 and batch_size >= 1")


def _pieces(source: str, tokenizer, stream):
    """(metadata row, base ids) of each piece of a dataset directory or a corpus spec."""
    from musefm.data.tokenize import encode, tokenizer_fingerprint

    folder = Path(source)
    if (folder / "dataset.json").is_file():
        from musefm.data.dataset import open_dataset

        dataset = open_dataset(folder)
        if tokenizer_fingerprint(dataset.tokenizer) != tokenizer_fingerprint(tokenizer):
            raise MusefmError(f"{source}: its tokenizer differs from the model's")
        for row in dataset.manifest:
            yield row, np.asarray(dataset.piece_ids(row))
        return
    from musefm.data.corpus import iter_pieces

    for piece in iter_pieces(source if ":" in source else f"dir:{source}"):
        try:
            yield piece.meta.to_dict(), encode(tokenizer, piece.score, piece.meta.path)
        except BadInputError as error:
            print(f"skipped {error}", file=stream)


def _bar_numbers(windows: dict, tokenizer) -> np.ndarray:
    """Piece-wide bar number of every token of ``piece_windows`` output: (W, L), -1 for special
    tokens and padding."""
    ids = windows["input_ids"].numpy()
    real = windows["attention_mask"].numpy()
    if ids.ndim == 3:  # Octuple: a bar field holds each note's bar number
        for field, vocabulary in enumerate(tokenizer.vocab):
            numbers = np.full(max(vocabulary.values()) + 1, -1)  # id -> bar number, -1 for specials
            for token, token_id in vocabulary.items():
                if token.startswith("Bar_"):
                    numbers[token_id] = int(token.split("_")[1])
            if (numbers >= 0).any():
                return np.where(real, numbers[ids[..., field]], -1)
        raise MusefmError("this Octuple tokenizer has no bar field")
    if tokenizer.is_trained:
        raise MusefmError("per_bar: bars cannot be located in BPE tokens (use a dataset without BPE)")
    bar_ids = np.asarray([i for token, i in tokenizer._vocab_base.items() if token.startswith("Bar_")])
    if not len(bar_ids):
        raise MusefmError(f"per_bar: {type(tokenizer).__name__} has no bar tokens (use remi or octuple)")
    # Rebuild the framed piece from its windows, number bars along it (a Bar token opens one),
    # and read each window's numbers back.
    starts = windows["start"].tolist()
    lengths = real.sum(axis=1)
    framed = np.zeros(max(s + n for s, n in zip(starts, lengths)), dtype=np.int64)
    for row, (start, length) in enumerate(zip(starts, lengths)):
        framed[start : start + length] = ids[row, :length]
    numbers = np.where(framed > 3, np.cumsum(np.isin(framed, bar_ids)) - 1, -1)  # ids 0-3 are special
    result = np.full(ids.shape, -1)
    for row, (start, length) in enumerate(zip(starts, lengths)):
        result[row, :length] = numbers[start : start + length]
    return result


@torch.no_grad()
def main(config: EmbedConfig, stream=None) -> dict:
    """Embed every piece of the source; returns a summary (pieces, dimension, files)."""
    from musefm.data.tokenize import load_tokenizer
    from musefm.models.base import load_pretrained
    from musefm.models.classifier import ClassifierConfig, PieceClassifier
    from musefm.recipes.finetune import piece_windows
    from musefm.training.checkpoint import resolve_model_dir

    stream = stream or sys.stderr
    config.validate()
    if not config.model or not config.source or not config.out:
        raise MusefmError("embed needs --model, --source and --out")
    model_dir = resolve_model_dir(config.model)
    backbone, _ = load_pretrained(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise MusefmError(f"{model_dir}: tokenizer.json is missing")
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    # The classifier's pooling without its head: one code path for features.
    pooler = PieceClassifier(backbone, ClassifierConfig(label_names=["-", "+"], pooling=config.pooling,
                                                        linear_probe=True)).eval()
    seq_len = config.seq_len or backbone.config.max_seq_len
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)

    vectors, index, bar_vectors, bar_rows = [], [], [], []
    for row, ids in _pieces(config.source, tokenizer, stream):
        windows = piece_windows(ids, seq_len, tokenizer)
        pooled = []
        for start in range(0, len(windows["input_ids"]), config.batch_size):
            batch = {key: value[start : start + config.batch_size] for key, value in windows.items()}
            pooled.append(pooler.features(batch["input_ids"], batch["attention_mask"]))  # (b, D)
        vectors.append(torch.cat(pooled).mean(dim=0).float().numpy())  # (D,)
        index.append({name: row.get(name) for name in INDEX_FIELDS})
        if config.per_bar:
            hidden = (backbone(windows["input_ids"], windows["attention_mask"]).hidden if backbone.family == "music-bert"
                      else backbone.hidden_states(windows["input_ids"], windows["attention_mask"])[0])  # (W, L, D)
            bars = _bar_numbers(windows, tokenizer)  # (W, L)
            for bar in sorted(set(bars[bars >= 0].tolist())):
                window = int(np.flatnonzero((bars == bar).any(axis=1))[0])  # first window holding the bar
                tokens = torch.from_numpy(bars[window] == bar)
                bar_vectors.append(hidden[window][tokens].mean(dim=0).float().numpy())  # (D,)
                bar_rows.append({"piece": len(index) - 1, "id": row.get("id"), "bar": bar})
    if not vectors:
        raise MusefmError(f"{config.source}: no piece could be embedded")
    embeddings = np.stack(vectors).astype(np.float32)  # (N, D)
    np.save(out / "embeddings.npy", embeddings)
    (out / "index.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in index))
    files = ["embeddings.npy", "index.jsonl"]
    if config.per_bar:
        np.save(out / "bars.npy", np.stack(bar_vectors).astype(np.float32) if bar_vectors
                else np.zeros((0, embeddings.shape[1]), np.float32))
        (out / "bars.jsonl").write_text("".join(json.dumps(entry) + "\n" for entry in bar_rows))
        files += ["bars.npy", "bars.jsonl"]
    if config.map != "none" and len(embeddings) >= 2:
        coordinates = MAPS[config.map](embeddings)
        plot_map(coordinates, [entry.get(config.color_by) for entry in index], out / "map.png",
                 f"{config.map.upper()} of {len(embeddings)} pieces, coloured by {config.color_by}")
        files.append("map.png")
    print(f"embedded {len(embeddings)} pieces ({embeddings.shape[1]} dimensions) into {out}", file=stream)
    return {"pieces": len(embeddings), "dimension": int(embeddings.shape[1]), "bars": len(bar_vectors),
            "files": files, "out": str(out)}


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """Projection (N, 2) onto the two leading principal axes (numpy SVD of the centred data)."""
    centred = vectors - vectors.mean(axis=0, keepdims=True)  # (N, D)
    _, _, axes = np.linalg.svd(centred, full_matrices=False)  # axes (min(N, D), D)
    projected = centred @ axes[:2].T  # (N, <=2)
    return np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))


def tsne_2d(vectors: np.ndarray) -> np.ndarray:
    """t-SNE coordinates (N, 2); the perplexity shrinks with small sets (it must stay below N)."""
    from sklearn.manifold import TSNE

    perplexity = max(1.0, min(30.0, (len(vectors) - 1) / 3))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=0).fit_transform(vectors)


def umap_2d(vectors: np.ndarray) -> np.ndarray:
    """UMAP coordinates (N, 2) with up to 15 neighbours (fewer for small sets), seeded."""
    import umap

    neighbours = max(2, min(15, len(vectors) - 1))
    # The spectral initialisation needs more points than dimensions + 1; tiny sets start at random.
    init = "spectral" if len(vectors) > 10 else "random"
    reducer = umap.UMAP(n_components=2, n_neighbors=neighbours, init=init, random_state=0, n_jobs=1)
    return reducer.fit_transform(vectors)


MAPS = {"pca": pca_2d, "tsne": tsne_2d, "umap": umap_2d}


def plot_map(coordinates: np.ndarray, groups: list, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 6), dpi=100)
    names = sorted({str(g) for g in groups})
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    labels = np.asarray([str(g) for g in groups])
    for number, name in enumerate(names):
        chosen = labels == name
        axes.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=14, color=colours(number % colours.N),
                     label=name if len(names) <= 20 else None)
    if len(names) <= 20:
        axes.legend(fontsize=8, markerscale=1.5)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
