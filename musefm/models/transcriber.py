"""Transcriber: an Onsets-and-Frames style piano transcription network (audio -> 88-key activations).

Reading order: config and presets, the layers (conv stack, bidirectional recurrent layer), the model
(log-mel front end, forward, loss), then inference over long audio in overlapping windows.

As in Onsets and Frames (Hawthorne et al. 2018), onset and offset heads are trained on their own
targets and the frame head sees their (detached) predictions, so a note's frames are tied to its
detected onset; velocity is regressed at onset frames only. Unlike the paper, one conv stack is
shared by every head by default: it keeps the model a few MB and cheap on a CPU, where the shipped
model has to run. ``onset_stack=True`` gives the onset head a conv stack of its own, as the paper does.

The log-mel front end (``musefm.audio.features``) is part of the model (a module with buffers), so the same features are
computed in training, on a GPU, and at inference, and a saved model carries its feature settings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from musefm.audio.features import LogMelSpectrogram, MelConfig, hz_to_mel, mel_band_edges_hz
from musefm.errors import MusefmError
from musefm.models.base import PretrainedModel, config_from_presets

NUM_KEYS = 88
HEADS = ("onset", "offset", "frame", "velocity")


@dataclass
class TranscriberConfig:
    # Features (log-mel; see musefm.audio.features.MelConfig)
    sample_rate: int = 16000
    n_fft: int = 2048
    hop_length: int = 320  # 50 frames per second
    n_mels: int = 229
    fmin: float = 30.0
    fmax: float = 8000.0
    # Network
    conv_channels: int = 32  # the first two conv layers; the third has twice as many
    d_model: int = 256  # acoustic features per frame after the conv stack
    rnn_hidden: int = 128  # per direction
    sequence_model: Literal["gru", "lstm"] = "gru"
    onset_stack: bool = False  # the onset head gets a conv stack of its own, as in Onsets and Frames
    # Harmonic stacking (as basic-pitch's HCQT): beside each mel band, the bands at these multiples of
    # its frequency (0.5: an octave below, 3: a twelfth above) as extra input channels, so the 3x3
    # convs can weigh a band against the notes whose partials would land on it. () = the plain log-mel.
    harmonics: tuple[float, ...] = ()
    dropout: float = 0.2
    # Loss
    onset_weight: float = 1.0
    offset_weight: float = 1.0
    frame_weight: float = 1.0
    velocity_weight: float = 1.0

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.hop_length

    def mel_config(self) -> MelConfig:
        return MelConfig(sample_rate=self.sample_rate, n_fft=self.n_fft, hop_length=self.hop_length,
                         n_mels=self.n_mels, fmin=self.fmin, fmax=self.fmax)

    def validate(self) -> None:
        for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "conv_channels", "d_model", "rnn_hidden"):
            if getattr(self, name) < 1:
                raise MusefmError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if self.n_mels < 4:
            raise MusefmError(f"n_mels: the conv stack pools the frequency axis twice, needs at least 4, got {self.n_mels}")
        if not 0 < self.fmin < self.fmax <= self.sample_rate / 2:
            raise MusefmError(f"fmin/fmax: need 0 < fmin < fmax <= sample_rate/2, got {self.fmin}, {self.fmax}")
        if self.sequence_model not in ("gru", "lstm"):
            raise MusefmError(f"sequence_model: must be 'gru' or 'lstm', got {self.sequence_model!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise MusefmError(f"dropout: must be in [0, 1), got {self.dropout}")
        self.harmonics = tuple(float(h) for h in self.harmonics)
        if any(h <= 0 or h == 1.0 for h in self.harmonics) or len(set(self.harmonics)) < len(self.harmonics):
            raise MusefmError(f"harmonics: distinct positive multiples other than 1, got {list(self.harmonics)}")


PRESETS = {
    "debug": TranscriberConfig(n_mels=48, conv_channels=4, d_model=16, rnn_hidden=8, dropout=0.0),
    "small": TranscriberConfig(),  # ~2M parameters; the shipped model is this with onset_stack (2.9M)
    "base": TranscriberConfig(conv_channels=48, d_model=768, rnn_hidden=256),  # Onsets-and-Frames width
}


def config_from_preset(name: str, **overrides) -> TranscriberConfig:
    config = config_from_presets(PRESETS, name, "transcriber", **overrides)
    config.validate()
    return config


class HarmonicStack(nn.Module):
    """(B, T, n_mels) log-mel -> (B, T, n_mels, 1 + H): each band, then the band nearest (on the mel
    scale) to each multiple of its centre frequency; a multiple past the filterbank reads silence."""

    def __init__(self, mel: MelConfig, harmonics: tuple[float, ...]):
        super().__init__()
        self.silence = math.log(mel.log_floor)
        centres_hz = mel_band_edges_hz(mel.n_mels, mel.fmin, mel.fmax)[1:-1]  # (n_mels,)
        centres_mel = hz_to_mel(centres_hz)  # evenly spaced
        step = centres_mel[1] - centres_mel[0]
        sources = []
        for harmonic in harmonics:
            position = (hz_to_mel(harmonic * centres_hz) - centres_mel[0]) / step  # (n_mels,) in bands
            nearest = np.rint(position).astype(np.int64)
            nearest[(nearest < 0) | (nearest >= mel.n_mels)] = mel.n_mels  # the silent column appended below
            sources.append(nearest)
        self.register_buffer("sources", torch.as_tensor(np.stack(sources)).reshape(-1) if sources
                             else torch.zeros(0, dtype=torch.long), persistent=False)  # (H * n_mels,)
        self.channels = 1 + len(harmonics)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        batch, frames, bands = mel.shape
        if self.channels == 1:
            return mel.unsqueeze(-1)  # (B, T, n_mels, 1)
        padded = F.pad(mel, (0, 1), value=self.silence)  # (B, T, n_mels + 1)
        moved = padded[..., self.sources].reshape(batch, frames, self.channels - 1, bands)  # (B, T, H, n_mels)
        return torch.cat([mel.unsqueeze(2), moved], dim=2).transpose(2, 3)  # (B, T, n_mels, 1 + H)


class ConvStack(nn.Module):
    """Three 3x3 conv layers over (time, mel) with two frequency poolings, then a linear layer."""

    def __init__(self, n_mels: int, channels: int, d_model: int, dropout: float, in_channels: int = 1):
        super().__init__()
        wide = 2 * channels
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.MaxPool2d((1, 2)), nn.Dropout(dropout),
            nn.Conv2d(channels, wide, 3, padding=1), nn.BatchNorm2d(wide), nn.ReLU(),
            nn.MaxPool2d((1, 2)), nn.Dropout(dropout),
        )
        self.project = nn.Sequential(nn.Linear(wide * (n_mels // 4), d_model), nn.Dropout(dropout))

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        """(B, T, n_mels, in_channels) -> (B, T, d_model); a plain log-mel may come as (B, T, n_mels)."""
        if stacked.dim() == 3:
            stacked = stacked.unsqueeze(-1)  # (B, T, n_mels, 1)
        batch, frames = stacked.shape[:2]
        image = stacked.permute(0, 3, 1, 2)  # (B, C, T, n_mels)
        if stacked.device.type == "cpu":  # oneDNN's NHWC kernels: 1.4x faster training, 1.6x inference on CPU
            # Channels-last strides spelled out (channel stride 1): with one channel, a row-major
            # mel.unsqueeze(1) already counts as channels-last, yet oneDNN then takes its NCHW path.
            image = image.contiguous(memory_format=torch.channels_last)
        else:
            image = image.contiguous()
        # Pure inference (eval mode, no autograd): batch norm folded into the convs. With autograd on,
        # the real layers run, so gradients reach the model's own weights.
        inference = not (self.training or torch.is_grad_enabled())
        hidden = (self.folded_convs() if inference else self.convs)(image)  # (B, C, T, n_mels // 4)
        hidden = hidden.transpose(1, 2).reshape(batch, frames, -1)  # (B, T, C * n_mels // 4)
        return self.project(hidden)  # (B, T, d_model)

    def folded_convs(self) -> nn.Sequential:
        """An inference copy of the conv layers (eval mode only): each batch norm folded into the conv
        before it, ReLU in place, no dropout. Same outputs to float rounding, 1.5x faster on a CPU."""
        if self.training:
            raise MusefmError("folded_convs: batch norm can only be folded in eval mode (call .eval() first)")
        layers, folded = list(self.convs), []
        for index, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):
                folded.append(fuse_conv_bn_eval(layer, layers[index + 1]))
            elif isinstance(layer, nn.ReLU):
                folded.append(nn.ReLU(inplace=True))
            elif isinstance(layer, nn.MaxPool2d):
                folded.append(layer)
            elif not isinstance(layer, (nn.BatchNorm2d, nn.Dropout)):  # folded above / identity in eval
                raise MusefmError(f"folded_convs: no folding rule for {type(layer).__name__}")
        return nn.Sequential(*folded)


class BiRNN(nn.Module):
    """A bidirectional GRU/LSTM over frames: (B, T, D_in) -> (B, T, 2 * hidden)."""

    def __init__(self, input_size: int, hidden: int, kind: str):
        super().__init__()
        cell = nn.GRU if kind == "gru" else nn.LSTM
        self.rnn = cell(input_size, hidden, batch_first=True, bidirectional=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class Transcriber(PretrainedModel):
    family = "transcriber"
    config_class = TranscriberConfig

    def __init__(self, config: TranscriberConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.mel = LogMelSpectrogram(config.mel_config())
        self.harmonic_stack = HarmonicStack(config.mel_config(), config.harmonics)
        stack = dict(in_channels=self.harmonic_stack.channels)
        self.acoustic = ConvStack(config.n_mels, config.conv_channels, config.d_model, config.dropout, **stack)
        self.onset_acoustic = (ConvStack(config.n_mels, config.conv_channels, config.d_model, config.dropout, **stack)
                               if config.onset_stack else None)
        width = 2 * config.rnn_hidden
        self.onset_rnn = BiRNN(config.d_model, config.rnn_hidden, config.sequence_model)
        self.onset_head = nn.Linear(width, NUM_KEYS)
        self.offset_rnn = BiRNN(config.d_model, config.rnn_hidden, config.sequence_model)
        self.offset_head = nn.Linear(width, NUM_KEYS)
        self.frame_acoustic = nn.Linear(config.d_model, NUM_KEYS)
        self.frame_rnn = BiRNN(3 * NUM_KEYS, config.rnn_hidden, config.sequence_model)
        self.frame_head = nn.Linear(width, NUM_KEYS)
        self.velocity_head = nn.Linear(config.d_model, NUM_KEYS)
        with torch.no_grad():  # notes are rare: start the onset/offset heads near their base rate
            for head in (self.onset_head, self.offset_head):
                head.bias.fill_(-4.0)

    def forward(self, audio: torch.Tensor | None = None, mel: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Logits of every head, (B, T, 88) each; give the waveform (B, samples) or its log-mel."""
        if mel is None:
            mel = self.mel(audio)  # (B, T, n_mels)
        stacked = self.harmonic_stack(mel)  # (B, T, n_mels, 1 + len(harmonics))
        features = self.acoustic(stacked)  # (B, T, d_model)
        onset_features = self.onset_acoustic(stacked) if self.onset_acoustic is not None else features
        onset = self.onset_head(self.onset_rnn(onset_features))  # (B, T, 88)
        offset = self.offset_head(self.offset_rnn(features))  # (B, T, 88)
        # The frame head sees the onset/offset predictions but does not train them.
        frame_input = torch.cat([torch.sigmoid(self.frame_acoustic(features)),
                                 torch.sigmoid(onset).detach(), torch.sigmoid(offset).detach()], dim=-1)  # (B, T, 264)
        frame = self.frame_head(self.frame_rnn(frame_input))  # (B, T, 88)
        velocity = self.velocity_head(features)  # (B, T, 88)
        return {"onset": onset, "offset": offset, "frame": frame, "velocity": velocity}

    def acoustic_features(self, mel: torch.Tensor) -> torch.Tensor:
        """The shared conv stack's features of a log-mel: (B, T, n_mels) -> (B, T, d_model)."""
        return self.acoustic(self.harmonic_stack(mel))

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict, None]:
        """Onset/offset/frame BCE + velocity MSE at onsets; batch holds ``audio`` (B, samples) and
        targets ``onset``, ``offset``, ``frame``, ``velocity`` (B, T, 88) with T = samples // hop + 1,
        and optionally ``loss_weight`` (B, T, 88), weighting the onset and frame BCE per frame and key."""
        config = self.config
        logits = self(batch["audio"])
        weight = batch.get("loss_weight")
        losses = {}
        for name in ("onset", "offset", "frame"):
            losses[name] = F.binary_cross_entropy_with_logits(logits[name].float(), batch[name],
                                                              weight=None if name == "offset" else weight)
        onsets = batch["onset"]
        velocity = torch.sigmoid(logits["velocity"].float())
        losses["velocity"] = (onsets * (velocity - batch["velocity"]).square()).sum() / onsets.sum().clamp_min(1.0)
        total = (config.onset_weight * losses["onset"] + config.offset_weight * losses["offset"]
                 + config.frame_weight * losses["frame"] + config.velocity_weight * losses["velocity"])
        with torch.no_grad():  # frame-level F1 of onsets at 0.5: a cheap progress signal
            predicted = logits["onset"] > 0
            true_positive = (predicted & (onsets > 0.5)).sum()
            f1 = 2 * true_positive / (predicted.sum() + (onsets > 0.5).sum()).clamp_min(1)
        frames = onsets.shape[0] * onsets.shape[1]
        metrics = {"loss": total.detach(), "tokens": frames, "accuracy": f1,
                   **{f"{name}_loss": value.detach() for name, value in losses.items()}}
        return total, metrics, None

    # ---- inference ----------------------------------------------------------------------

    @torch.no_grad()
    def activations(self, mel: torch.Tensor, window_frames: int = 2000, overlap_frames: int = 100) -> dict:
        """Probabilities of every head for a whole piece's log-mel (T, n_mels) -> {head: (T, 88)}.

        Long inputs are cut into windows that overlap by ``overlap_frames`` on each side; each
        window keeps its centre, so memory is bounded and the recurrent layers still see context.
        """
        blocks = list(self.iter_activations([mel], window_frames, overlap_frames))
        if not blocks:
            return {name: np.zeros((0, NUM_KEYS), np.float32) for name in HEADS}
        return {name: np.concatenate([block[name] for block in blocks]) for name in HEADS}

    @torch.no_grad()
    def iter_activations(self, mel_blocks: Iterable[torch.Tensor], window_frames: int = 2000,
                         overlap_frames: int = 100) -> Iterator[dict]:
        """``activations`` over log-mel frames that arrive in blocks ``(frames, n_mels)`` (a stream
        from ``iter_log_mel``): yields {head: (frames, 88)} probabilities, one block per window, that
        concatenate to ``activations`` of the whole. The windows are the same ones, so the results
        are too; only the frames the next window still needs are kept."""
        self.eval()
        device = next(self.parameters()).device
        step = max(1, window_frames - 2 * overlap_frames)
        pending = torch.zeros(0, self.config.n_mels)  # mel frames [pending_from, pending_from + len)
        pending_from = window_start = 0

        def window(high: int) -> dict:  # the window kept from window_start, seeing frames up to high
            low = max(0, window_start - overlap_frames)
            logits = self(mel=pending[low - pending_from : high - pending_from].unsqueeze(0).to(device))
            keep = slice(window_start - low, min(window_start + step, high) - low)
            return {name: torch.sigmoid(logits[name][0, keep].float()).cpu().numpy() for name in HEADS}

        for block in mel_blocks:
            pending = torch.cat([pending, torch.as_tensor(block, dtype=torch.float32)])
            while pending_from + len(pending) >= window_start + step + overlap_frames:
                yield window(window_start + step + overlap_frames)
                window_start += step
                drop = max(0, window_start - overlap_frames - pending_from)
                pending, pending_from = pending[drop:], pending_from + drop
        total = pending_from + len(pending)
        while window_start < total:  # the last windows end where the input does
            yield window(total)
            window_start += step

    def with_onset_stack(self) -> "Transcriber":
        """This model grown to Onsets and Frames' layout: a new model whose onset conv stack starts as
        a copy of the shared one, so it transcribes exactly as this one until fine-tuning parts them."""
        if self.onset_acoustic is not None:
            raise MusefmError("with_onset_stack: the model already has an onset conv stack")
        grown = Transcriber(dataclasses.replace(self.config, onset_stack=True))
        copied = {f"onset_acoustic.{key}": value for key, value in self.acoustic.state_dict().items()}
        grown.load_state_dict({**self.state_dict(), **copied})
        return grown.train(self.training)

    def with_harmonics(self, harmonics) -> "Transcriber":
        """This model grown to read harmonic stacking (``TranscriberConfig.harmonics``): the first conv of
        each stack gains an input channel per harmonic, with zero weights, so it transcribes exactly as
        this one until fine-tuning learns what the new channels tell."""
        if self.config.harmonics:
            raise MusefmError(f"with_harmonics: the model already reads harmonics {list(self.config.harmonics)}")
        grown = Transcriber(dataclasses.replace(self.config, harmonics=tuple(harmonics)))
        state = self.state_dict()
        for name, value in grown.state_dict().items():
            if name.endswith("convs.0.weight"):  # (channels, 1 + H, 3, 3): the old plain-mel channel first
                state[name] = torch.cat([state[name], torch.zeros_like(value[:, 1:])], dim=1)
        grown.load_state_dict(state)
        return grown.train(self.training)

    def widened(self, d_model: int | None = None, rnn_hidden: int | None = None, seed: int = 0) -> "Transcriber":
        """This model grown wider: ``d_model`` acoustic features per frame and ``rnn_hidden`` units per
        recurrent direction, at least the current ones. It transcribes exactly as this one until
        fine-tuning uses the new units: each new unit reads the old ones through fresh random weights
        (so it computes something and whatever reads it gets a gradient), and every weight that reads
        a new unit starts at zero, so no old unit or head output changes."""
        config = self.config
        grown_config = dataclasses.replace(config, d_model=config.d_model if d_model is None else d_model,
                                           rnn_hidden=config.rnn_hidden if rnn_hidden is None else rnn_hidden)
        if grown_config.d_model < config.d_model or grown_config.rnn_hidden < config.rnn_hidden:
            raise MusefmError(f"widened: can only grow (d_model {config.d_model} -> {grown_config.d_model}, "
                              f"rnn_hidden {config.rnn_hidden} -> {grown_config.rnn_hidden})")
        with torch.random.fork_rng(devices=[]):  # the new units' weights are seeded; the caller's RNG is untouched
            torch.manual_seed(seed)
            grown = Transcriber(grown_config)
        old, state = self.state_dict(), grown.state_dict()  # state: fresh random weights to start from
        for name, value in state.items():
            rows, columns = _widening_maps(name, config, grown_config)
            if rows is None and columns is None:
                state[name] = old[name].clone()
                continue
            rows = torch.arange(value.shape[0]) if rows is None else rows
            if value.dim() == 1:
                value[rows] = old[name]
                continue
            columns = torch.arange(value.shape[1]) if columns is None else columns
            new_columns = torch.ones(value.shape[1], dtype=torch.bool)
            new_columns[columns] = False
            value[:, new_columns] = 0.0  # nothing reads a new unit yet
            value[rows[:, None], columns[None, :]] = old[name]
        grown.load_state_dict(state)
        return grown.train(self.training)

    def num_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.parameters())



def _grouped_positions(groups: int, old_size: int, new_size: int) -> torch.Tensor:
    """Where each of ``groups * old_size`` stacked entries (GRU gates, the two directions of a
    bidirectional output) lands when every group grows to ``new_size``."""
    return (torch.arange(groups)[:, None] * new_size + torch.arange(old_size)[None, :]).reshape(-1)


def _widening_maps(name: str, old: TranscriberConfig, new: TranscriberConfig) -> tuple:
    """(new index of each old row, new index of each old column) of parameter ``name`` when the
    model widens from ``old`` to ``new``; None for an axis that keeps its size."""
    features = torch.arange(old.d_model)  # acoustic features keep their places; new ones follow
    gates = 3 if old.sequence_model == "gru" else 4
    gate_rows = _grouped_positions(gates, old.rnn_hidden, new.rnn_hidden)
    if name.endswith("project.0.weight") or name.endswith("project.0.bias"):
        return features, None
    if ".rnn.weight_ih" in name:  # (gates * H, input): the frame RNN reads the 264 head outputs
        return gate_rows, None if name.startswith("frame_rnn") else features
    if ".rnn.weight_hh" in name:
        return gate_rows, torch.arange(old.rnn_hidden)
    if ".rnn.bias" in name:
        return gate_rows, None
    if name in ("onset_head.weight", "offset_head.weight", "frame_head.weight"):  # (88, 2H)
        return None, _grouped_positions(2, old.rnn_hidden, new.rnn_hidden)
    if name in ("frame_acoustic.weight", "velocity_head.weight"):  # (88, d_model)
        return None, features
    return None, None
