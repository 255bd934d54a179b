"""``musefm finetune`` / ``musefm predict``: piece classification on top of a pretrained model.

    musefm finetune --model runs/bert --data data/mix --task composer --out runs/cls [--linear-probe]
    musefm predict --model runs/cls piece.mid

Labels come from the dataset's manifest (task composer, collection, key, mode = major/minor of the
key, meter = time signature) or from a CSV of ``piece,label`` rows (task labels; piece = manifest
id or source path). Pieces without a label are left out and counted. Splits are the dataset's,
made by piece, so no piece is in two of them.

No augmentation is applied while fine-tuning: key labels are the manifest's, untransposed, and the
other labels do not depend on pitch, tempo or velocity. ``neutral_fields`` (Octuple) sets fields
such as tempo, time signature, program and velocity to one value in every note, in training and in
prediction alike (the classifier keeps the values): a collection whose pieces share a tempo or a
meter is then told apart by its notes, not by that metadata.

The run directory ``out/`` holds the classifier (``out/model/``, loadable by ``predict``), the
trainer's checkpoints and ``best/`` (lowest validation loss, which becomes ``model/``),
``metrics.jsonl``, ``metrics.json`` (accuracy, macro-F1, per-class precision/recall/F1/support and
the confusion matrix on the test split, or on valid when test is empty) and
``confusion_matrix.png``. A piece is classified by averaging the class probabilities of all its
windows; the metrics are per piece.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from musefm.data.dataset import MASK
from musefm.errors import MusefmError

TASKS = ("composer", "collection", "key", "mode", "meter", "labels")
MODEL_DIR = "model"


@dataclass
class FinetuneConfig:
    model: str = ""  # pretrained model or run directory (music-bert or music-lm)
    data: str = ""  # dataset built with the tokenizer the model was trained on
    out: str = ""
    task: Literal["composer", "collection", "key", "mode", "meter", "labels"] = "composer"
    labels_csv: str | None = None  # task "labels": CSV of piece,label
    linear_probe: bool = False
    freeze_layers: int = 0
    pooling: Literal["mean", "first", "last"] = "mean"
    dropout: float = 0.1
    balance: Literal["none", "weights", "sampling"] = "none"
    seq_len: int = 0  # 0 = the backbone's max_seq_len
    label_fraction: float = 1.0  # share of labelled training pieces used (stratified, seeded)
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    # Octuple fields set to one value in every note (their most common value in the training split):
    # e.g. ["tempo", "timesig", "program", "velocity"], so the label must come from the notes.
    neutral_fields: list[str] = field(default_factory=list)
    warmup_steps: int = 10
    weight_decay: float = 0.01
    eval_every: int = 50
    eval_batches: int = 50
    seed: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: str = "auto"

    def validate(self) -> None:
        if self.task not in TASKS:
            raise MusefmError(f"task: must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.task == "labels" and not self.labels_csv:
            raise MusefmError("task 'labels' needs labels_csv (--labels CSV)")
        if self.labels_csv and self.task != "labels":
            raise MusefmError(f"labels_csv is only used with task 'labels', not {self.task!r}")
        if self.balance not in ("none", "weights", "sampling"):
            raise MusefmError(f"balance: must be none, weights or sampling, got {self.balance!r}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise MusefmError(f"label_fraction: must be in (0, 1], got {self.label_fraction}")
        if self.freeze_layers < 0 or self.seq_len < 0:
            raise MusefmError("freeze_layers and seq_len must be >= 0")
        if self.linear_probe and self.freeze_layers:
            raise MusefmError("use either linear_probe or freeze_layers, not both")
        for name in ("steps", "batch_size", "eval_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise MusefmError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise MusefmError(f"lr: must be > 0, got {self.lr}")


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def manifest_label(row: dict, task: str) -> str | None:
    """The label of a manifest row for a manifest task, or None when the row has none."""
    if task in ("composer", "collection"):
        value = row.get(task)
    elif task == "key":
        value = row.get("key")
    elif task == "mode":
        value = row["key"].split()[-1] if row.get("key") else None
    elif task == "meter":
        value = row.get("time_signature")
    else:
        raise MusefmError(f"task {task!r} does not read labels from the manifest")
    return str(value) if value not in (None, "") else None


def read_label_csv(path, dataset) -> tuple[dict[str, str], list[str]]:
    """``{piece id: label}`` from a ``piece,label`` CSV, and one message per unusable row.

    A piece is a manifest id or a source path. A header row ``piece,label`` is allowed. Rows with
    the wrong number of fields, an empty label, an unknown piece, or a piece already given another
    label are unusable; each message names the row number and the piece.
    """
    path = Path(path)
    if not path.is_file():
        raise MusefmError(f"{path}: label file not found")
    by_name = {}
    for row in dataset.manifest:
        by_name[row["id"]] = row["id"]
        if row.get("path"):
            by_name.setdefault(row["path"], row["id"])
            by_name.setdefault(str(Path(row["path"]).resolve()), row["id"])
    labels, problems = {}, []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, fields in enumerate(csv.reader(handle), start=1):
            if not fields or all(not value.strip() for value in fields):
                continue
            if number == 1 and [value.strip().lower() for value in fields] == ["piece", "label"]:
                continue
            if len(fields) != 2:
                problems.append(f"{path}:{number}: expected 'piece,label', got {len(fields)} field(s): {','.join(fields)!r}")
                continue
            piece, label = fields[0].strip(), fields[1].strip()
            if not label:
                problems.append(f"{path}:{number}: piece {piece!r} has an empty label")
                continue
            piece_id = by_name.get(piece) or by_name.get(str(Path(piece).resolve()))
            if piece_id is None:
                problems.append(f"{path}:{number}: unknown piece {piece!r} (not a manifest id or source path)")
                continue
            if piece_id in labels and labels[piece_id] != label:
                problems.append(f"{path}:{number}: piece {piece!r} labelled {label!r} here and "
                                f"{labels[piece_id]!r} before")
                continue
            labels[piece_id] = label
    return labels, problems


def neutral_field_ids(dataset, names: list[str]) -> list[list[int]]:
    """[column, token id] for each named Octuple field: its most common id over the training split's
    notes (the whole dataset when it has no training split)."""
    from collections import Counter

    from musefm.models.music_bert import octuple_fields

    if not names:
        return []
    if not dataset.tokenizer.is_multi_voc:
        raise MusefmError(f"neutral_fields: {', '.join(names)} are Octuple fields, but {dataset.root} holds "
                          f"{type(dataset.tokenizer).__name__} tokens")
    fields, _ = octuple_fields(dataset.tokenizer)
    unknown = [name for name in names if name.lower() not in fields]
    if unknown:
        raise MusefmError(f"neutral_fields: {', '.join(unknown)} not among the Octuple fields {', '.join(fields)}")
    columns = [fields.index(name.lower()) for name in names]
    counts = {column: Counter() for column in columns}
    for row in dataset.rows("train") or dataset.manifest:
        ids = np.asarray(dataset.piece_ids(row))  # (notes, F)
        for column in columns:
            counts[column].update(ids[:, column][ids[:, column] > MASK].tolist())
    return [[column, int(count.most_common(1)[0][0])] for column, count in counts.items() if count]


def stratified_subset(piece_ids: list[str], labels: dict[str, str], fraction: float, seed: int) -> list[str]:
    """``fraction`` of the pieces of each class (at least one per class), drawn with ``seed``."""
    if fraction >= 1.0:
        return list(piece_ids)
    rng = np.random.default_rng(seed)
    kept = []
    for label in sorted({labels[p] for p in piece_ids}):
        members = sorted(p for p in piece_ids if labels[p] == label)
        count = max(1, int(round(fraction * len(members))))
        kept += [members[i] for i in sorted(rng.choice(len(members), size=count, replace=False))]
    return [p for p in piece_ids if p in set(kept)]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


class LabeledWindows:
    """Windows of the labelled pieces of one split, each with ``label`` () int64.

    ``balance="sampling"``: each epoch the items are drawn (with replacement, seeded by seed and
    epoch) so that every class is equally likely, whatever its number of windows.
    """

    def __init__(self, windows, labels: dict[str, int], balance: str = "none", seed: int = 0):
        self.windows, self.balance, self.seed = windows, balance, seed
        piece_labels = [labels.get(row["id"], -1) for row in windows.rows]
        item_labels = np.asarray([piece_labels[piece] for piece in windows.piece_of_item], dtype=np.int64)
        self.items = np.flatnonzero(item_labels >= 0)  # (N,) indices into the window dataset
        self.item_labels = item_labels[self.items]  # (N,)
        self.order = self.items
        self.epoch = -1
        self.set_epoch(0)

    @property
    def window(self) -> str:
        return self.windows.window

    def set_epoch(self, epoch: int) -> None:
        self.windows.set_epoch(epoch)
        if self.balance == "sampling" and epoch != self.epoch:
            counts = np.bincount(self.item_labels)
            probability = 1.0 / counts[self.item_labels]
            rng = np.random.default_rng([self.seed, epoch, 7])
            self.order = rng.choice(self.items, size=len(self.items), replace=True, p=probability / probability.sum())
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = int(self.order[index])
        example = self.windows[item]
        position = int(np.searchsorted(self.items, item))
        example["label"] = torch.tensor(int(self.item_labels[position]))
        return example


def class_weights(item_labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights n / (C * count), 0 for classes without training examples."""
    counts = np.bincount(item_labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(item_labels) / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def classification_metrics(true: list[int], predicted: list[int], label_names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix.

    ``confusion[i][j]`` counts pieces of class i predicted as j. Macro-F1 averages the classes that
    occur in ``true`` or ``predicted`` (as scikit-learn does); precision, recall or F1 with a zero
    denominator is 0.
    """
    size = len(label_names)
    confusion = np.zeros((size, size), dtype=np.int64)
    for t, p in zip(true, predicted):
        confusion[t, p] += 1
    per_class, f1s = {}, []
    for index, name in enumerate(label_names):
        tp = int(confusion[index, index])
        support, predicted_count = int(confusion[index].sum()), int(confusion[:, index].sum())
        precision = tp / predicted_count if predicted_count else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted_count:
            f1s.append(f1)
    total = int(confusion.sum())
    return {"accuracy": float(np.trace(confusion)) / total if total else 0.0,
            "macro_f1": float(np.mean(f1s)) if f1s else 0.0, "pieces": total,
            "per_class": per_class, "labels": list(label_names), "confusion": confusion.tolist()}


def plot_confusion(confusion: list[list[int]], label_names: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(confusion)
    size = len(label_names)
    figure, axes = plt.subplots(figsize=(max(4.0, 0.5 * size + 2), max(3.5, 0.5 * size + 1.5)), dpi=100)
    image = axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(size), label_names, rotation=45, ha="right")
    axes.set_yticks(range(size), label_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for i in range(size):
        for j in range(size):
            axes.text(j, i, str(matrix[i, j]), ha="center", va="center",
                      color="white" if matrix[i, j] > matrix.max() / 2 else "black", fontsize=8)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


@torch.no_grad()
def piece_probabilities(model, windows, batch_size: int, device) -> np.ndarray:
    """Class probabilities (P, C) of every piece of ``windows``: its windows' mean."""
    from musefm.training.trainer import collate

    sums = np.zeros((len(windows.rows), model.config.num_classes))
    counts = np.zeros(len(windows.rows))
    for start in range(0, len(windows), batch_size):
        items = [windows[i] for i in range(start, min(start + batch_size, len(windows)))]
        batch = {key: value.to(device) for key, value in collate(items).items()}
        probabilities = model.predict(batch).cpu().numpy()  # (B, C)
        pieces = batch["piece"].cpu().numpy()
        np.add.at(sums, pieces, probabilities)
        np.add.at(counts, pieces, 1)
    return sums / np.maximum(counts, 1)[:, None]


# --------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------


def _task_labels(config: FinetuneConfig, dataset, stream) -> tuple[dict[str, str], dict]:
    report = {}
    if config.task == "labels":
        labels, problems = read_label_csv(config.labels_csv, dataset)
        report = {"csv_rows_used": len(labels), "csv_rows_rejected": len(problems), "csv_problems": problems}
        if not labels:
            shown = "; ".join(problems[:3]) or "it has no rows"
            raise MusefmError(f"{config.labels_csv}: no usable label rows ({shown})")
        for problem in problems[:20]:
            print(f"skipped {problem}", file=stream)
        if len(problems) > 20:
            print(f"... and {len(problems) - 20} more bad rows (all in metrics.json)", file=stream)
    else:
        labels = {row["id"]: label for row in dataset.manifest
                  if (label := manifest_label(row, config.task)) is not None}
    report["unlabelled_pieces"] = sum(1 for row in dataset.manifest if row["id"] not in labels)
    return labels, report


def main(config: FinetuneConfig, overwrite: bool = False, stream=None) -> dict:
    """Fine-tune, evaluate and save; returns the summary (also in ``out/metrics.json``)."""
    from musefm.data.dataset import TokenDataset, open_dataset
    from musefm.data.tokenize import tokenizer_fingerprint, load_tokenizer
    from musefm.models.base import load_pretrained
    from musefm.models.classifier import ClassifierConfig, PieceClassifier
    from musefm.training.checkpoint import resolve_model_dir
    from musefm.training.distributed import init_distributed, shutdown
    from musefm.training.seed import seed_everything
    from musefm.training.trainer import TrainConfig, Trainer

    stream = stream or sys.stderr
    config.validate()
    if not config.model or not config.data or not config.out:
        raise MusefmError("finetune needs --model (pretrained run), --data (dataset) and --out (run directory)")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise MusefmError(f"{out}: is not empty; use --overwrite to replace it")

    backbone_dir = resolve_model_dir(config.model)
    backbone, _ = load_pretrained(backbone_dir)
    dataset = open_dataset(config.data)
    model_tokenizer_path = backbone_dir / "tokenizer.json"
    if model_tokenizer_path.is_file() and (tokenizer_fingerprint(load_tokenizer(model_tokenizer_path))
                                           != tokenizer_fingerprint(dataset.tokenizer)):
        raise MusefmError(f"{config.data}: its tokenizer differs from the model's ({backbone_dir})")

    labels, report = _task_labels(config, dataset, stream)
    label_names = sorted(set(labels.values()))
    if len(label_names) < 2:
        only = f" (every labelled piece is {label_names[0]!r})" if label_names else " (no piece has a label)"
        raise MusefmError(f"task {config.task!r} has {len(label_names)} class{only}; a classifier needs at least 2")
    train_ids = [row["id"] for row in dataset.rows("train") if row["id"] in labels]
    train_classes = sorted({labels[p] for p in train_ids})
    if len(train_classes) < 2:
        raise MusefmError(f"task {config.task!r}: the training split has {len(train_classes)} class(es) "
                          f"({', '.join(train_classes) or 'no labelled piece'}); a classifier needs at least 2")
    train_ids = stratified_subset(train_ids, labels, config.label_fraction, config.seed)
    index_of = {name: i for i, name in enumerate(label_names)}
    train_labels = {p: index_of[labels[p]] for p in train_ids}
    all_labels = {p: index_of[label] for p, label in labels.items()}

    seq_len = config.seq_len or backbone.config.max_seq_len
    classifier_config = ClassifierConfig(label_names=label_names, pooling=config.pooling, dropout=config.dropout,
                                         linear_probe=config.linear_probe, freeze_layers=config.freeze_layers,
                                         seq_len=seq_len, neutral=neutral_field_ids(dataset, config.neutral_fields))
    train_config = TrainConfig(max_steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                               warmup_steps=min(config.warmup_steps, config.steps), weight_decay=config.weight_decay,
                               eval_every=config.eval_every, eval_batches=config.eval_batches,
                               save_every=config.steps, keep_last=1, log_every=max(1, min(10, config.eval_every)),
                               precision=config.precision, device=config.device, seed=config.seed)
    evaluation_split = "test" if any(row["id"] in labels for row in dataset.rows("test")) else "valid"

    context = init_distributed(config.device)
    try:
        if context.is_main and overwrite and out.exists():
            shutil.rmtree(out)
        seed_everything(config.seed)
        model = PieceClassifier(backbone, classifier_config)
        train_data = LabeledWindows(TokenDataset(dataset, "train", seq_len, window="random", seed=config.seed),
                                    train_labels, config.balance, config.seed)
        valid_data = None
        if any(row["id"] in labels for row in dataset.rows("valid")):
            valid_data = LabeledWindows(TokenDataset(dataset, "valid", seq_len, window="sequential"), all_labels)
        if config.balance == "weights":
            model.class_weights.copy_(class_weights(train_data.item_labels, len(label_names)))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        if context.is_main:
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dataset.root / "tokenizer.json", out / "tokenizer.json")
            print(f"finetune {config.task}: {len(label_names)} classes, {len(train_ids)} training pieces "
                  f"({len(train_data)} windows), {trainable:,} of {total:,} parameters trained", file=stream)
        trainer = Trainer(model, train_data, valid_data, train_config, out, out / "tokenizer.json", context, stream)
        summary = trainer.fit()
        if not context.is_main:
            return summary
        best = out / "best"
        if (best / "model.safetensors").is_file():
            # The lowest validation loss is the classifier kept (as pretrain keeps best/).
            model = PieceClassifier.from_pretrained(best, map_location=str(context.device))
        model.save_pretrained(out / MODEL_DIR, out / "tokenizer.json")

        windows = TokenDataset(dataset, evaluation_split, seq_len, window="sequential")
        probabilities = piece_probabilities(model, windows, config.batch_size, context.device)  # (P, C)
        rows = [(i, all_labels[row["id"]]) for i, row in enumerate(windows.rows) if row["id"] in all_labels]
        true = [label for _, label in rows]
        predicted = [int(probabilities[i].argmax()) for i, _ in rows]
        metrics = classification_metrics(true, predicted, label_names)
        plot_confusion(metrics["confusion"], label_names, out / "confusion_matrix.png",
                       f"{config.task} ({evaluation_split}): accuracy {metrics['accuracy']:.3f}")
        result = {"task": config.task, "split": evaluation_split, **metrics, "steps": summary["step"],
                  "train_pieces": len(train_ids), "trained_parameters": trainable, **report,
                  "model_dir": str(out / MODEL_DIR)}
        (out / "metrics.json").write_text(json.dumps(result, indent=2))
        print(f"{evaluation_split}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} on "
              f"{metrics['pieces']} pieces; classifier in {out / MODEL_DIR}", file=stream)
        return result
    finally:
        shutdown(context)


# --------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------


def classifier_dir(path) -> Path:
    """The classifier directory of a finetune run (``out/model``) or the directory itself."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    raise MusefmError(f"{path}: not a classifier or finetune run (no config.json or {MODEL_DIR}/)")


def piece_windows(ids: np.ndarray, seq_len: int, tokenizer) -> dict:
    """A piece's ids as [BOS] ids [EOS] cut into consecutive windows (the last one ending at the
    piece's end, as the dataset's "sequential" windows): input_ids (W, L) or (W, L, F), mask (W, L),
    start (W,)."""
    from musefm.data.dataset import BOS, EOS, PAD
    from musefm.data.tokenize import apply_bpe

    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim == 2:
        fields = ids.shape[1]
        framed = np.concatenate([np.full((1, fields), BOS), ids, np.full((1, fields), EOS)])  # (n + 2, F)
    else:
        framed = apply_bpe(tokenizer, np.concatenate([[BOS], ids, [EOS]]))  # (n + 2,)
    length = len(framed)
    starts = sorted({min(start, max(0, length - seq_len)) for start in range(0, length, seq_len)})
    shape = (len(starts), seq_len) + framed.shape[1:]
    input_ids = np.full(shape, PAD, dtype=np.int64)
    mask = np.zeros((len(starts), seq_len), dtype=bool)
    for row, start in enumerate(starts):
        window = framed[start : start + seq_len]
        input_ids[row, : len(window)] = window
        mask[row, : len(window)] = True
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(mask),
            "start": torch.tensor(starts)}  # (W,) offset of each window in the framed piece


@torch.no_grad()
def predict(model_dir, paths_or_ids: list[str], data: str | None = None,
            batch_size: int = 16) -> list[tuple[str, float]]:
    """(label, probability) of each piece: a music file or source spec, or (with ``data``) a
    manifest id of that dataset. A piece's windows' probabilities are averaged."""
    from musefm.data.corpus import load_piece
    from musefm.data.tokenize import encode, load_tokenizer
    from musefm.models.classifier import PieceClassifier

    directory = classifier_dir(model_dir)
    model = PieceClassifier.from_pretrained(directory)
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise MusefmError(f"{directory}: tokenizer.json is missing")
    tokenizer = load_tokenizer(tokenizer_path)
    dataset = None
    if data is not None:
        from musefm.data.dataset import open_dataset

        dataset = open_dataset(data)
    seq_len = model.config.seq_len or model.backbone.config.max_seq_len
    results = []
    for name in paths_or_ids:
        if dataset is not None and name in {row["id"] for row in dataset.manifest}:
            ids = np.asarray(dataset.piece_ids(dataset.row(name)))
        else:
            ids = encode(tokenizer, load_piece(name).score, name)
        windows = piece_windows(ids, seq_len, tokenizer)
        probabilities = torch.cat([model.predict({key: value[start : start + batch_size]
                                                  for key, value in windows.items()})
                                   for start in range(0, len(windows["input_ids"]), batch_size)])  # (W, C)
        mean = probabilities.mean(dim=0)  # (C,)
        best = int(mean.argmax())
        results.append((model.config.label_names[best], float(mean[best])))
    return results
