"""``musefm generate``: continue a prompt (or start from nothing) with a trained MusicLM, or infill bars.

Everything is checked before anything is generated or written: the model directory and its family,
its tokenizer against the model's vocabulary, the prompt (readable, encodable, accepted by the
grammar), the stop rules and the musical constraints. Then, per sample, ``out/`` gets
``sample_KK.mid``, ``.wav`` (FluidSynth, when asked and available), ``.png`` (piano roll, the
generated part shaded) and ``.json`` (settings, seed, token ids, per-token log-probabilities, notes,
duration, grammar errors).

Continuations come from ``musefm.generation.continuation``, which decides seeds, stop rules and beam
search. Infilling (``infill="I:J"``) regenerates bars I..J of the prompt, the rest unchanged. Bars
are numbered from 1 here, as a score numbers them (``musefm.generation.infill`` numbers from 0). A
MusicLM samples ``infill_candidates`` and keeps the one the right context likes best; a MusicBERT
(usable for infilling only) runs ``infill_iterations`` mask-predict passes. Sample ``k`` uses seed
``seed + k``; the piano roll shades bars I..J.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from symusic import Score

from musefm.config import to_dict
from musefm.data.dataset import BOS
from musefm.data.tokenize import bar_token_ids, decode
from musefm.errors import MusefmError
from musefm.generation.continuation import (DEFAULT_MAX_TOKENS, Sample, check_compatible, decode_ids,
                                            generate_samples, music_ids, seconds_of)


@dataclass
class GenerateConfig:
    model: str = ""  # run dir or model dir (MusicLM; MusicBERT for infilling only)
    out: str = ""
    prompt: str | None = None  # file path or corpus id; None = from scratch (BOS only)
    prompt_bars: int = 0  # keep only the first N bars of the prompt (0 = all of it)
    num_samples: int = 1
    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.95
    beam: int = 0  # > 0: length-normalised beam search; returns the best `num_samples` beams
    max_tokens: int = 0  # stop rules: at most this many new tokens ...
    bars: int = 0  # ... or this many new bars (REMI: count Bar tokens) ...
    seconds: float = 0.0  # ... or this much new music (decode and measure)
    key: str | None = None
    pitch_low: int | None = None
    pitch_high: int | None = None
    programs: list[int] | None = None
    time_signature: str | None = None
    max_notes_per_onset: int = 12  # no onset may start more notes (0 = no limit)
    constrained: bool = True  # grammar-constrained decoding (always valid output)
    render: bool = True  # WAV through FluidSynth; skipped with a note when unavailable
    infill: str | None = None  # "I:J": regenerate bars I..J of the prompt (numbered from 1, both included)
    infill_candidates: int = 8  # MusicLM infilling: candidates drawn, the best under the right context kept
    infill_iterations: int = 10  # MusicBERT infilling: mask-predict passes

    def validate(self) -> None:
        if not self.model:
            raise MusefmError("no model given (--model RUN_OR_MODEL_DIR)")
        if not self.out:
            raise MusefmError("no output directory given (--out)")
        for name in ("prompt_bars", "top_k", "beam", "max_tokens", "bars", "max_notes_per_onset"):
            if getattr(self, name) < 0:
                raise MusefmError(f"{name}: must be 0 or more, got {getattr(self, name)}")
        if self.num_samples < 1:
            raise MusefmError(f"num_samples: must be at least 1, got {self.num_samples}")
        if self.seconds < 0:
            raise MusefmError(f"seconds: must be 0 or more, got {self.seconds}")
        if self.temperature <= 0:
            raise MusefmError(f"temperature: must be above 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MusefmError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.beam and self.num_samples > self.beam:
            raise MusefmError(f"num_samples: beam search of {self.beam} beams cannot return {self.num_samples}")
        if self.beam and (self.bars or self.seconds):
            raise MusefmError("beam: beam search stops on max_tokens only; bars and seconds need sampling")
        if (self.pitch_low is None) != (self.pitch_high is None):
            raise MusefmError("pitch range: give both the lowest and the highest pitch")
        musical = [name for name in ("key", "pitch_low", "programs", "time_signature") if getattr(self, name) is not None]
        if musical and not self.constrained:
            raise MusefmError(f"{musical[0]}: musical constraints need constrained decoding (drop --no-constraint)")
        if self.infill is not None:
            self.infill_bars()
            if self.prompt is None:
                raise MusefmError("infill: needs --prompt, the piece whose bars are regenerated")
            for name in ("beam", "max_tokens", "bars", "seconds"):
                if getattr(self, name):
                    raise MusefmError(f"{name}: a continuation setting; --infill regenerates exactly bars I..J")
            if self.time_signature is not None:
                raise MusefmError("time_signature: infilled bars keep the piece's time signatures")
            for name in ("infill_candidates", "infill_iterations"):
                if getattr(self, name) < 1:
                    raise MusefmError(f"{name}: must be at least 1, got {getattr(self, name)}")

    def infill_bars(self) -> tuple[int, int] | None:
        """The ``infill`` bars I:J (numbered from 1) as 0-based (i, j); None without infilling."""
        if self.infill is None:
            return None
        parts = str(self.infill).split(":")
        try:
            first, last = (int(part) for part in parts)
        except ValueError:
            raise MusefmError(f"infill: expected I:J, two bar numbers from 1 (e.g. 3:4), got {self.infill!r}") from None
        if first < 1 or first > last:
            raise MusefmError(f"infill: {self.infill} is not a range of bars I <= J numbered from 1")
        return first - 1, last - 1

    def stop_rules(self) -> tuple[int, int, float]:
        """(max_tokens, bars, seconds) with the default when none is given."""
        if not (self.max_tokens or self.bars or self.seconds):
            return DEFAULT_MAX_TOKENS, 0, 0.0
        return self.max_tokens, self.bars, self.seconds


# -- the recipe ------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything ``main`` checked before generating."""

    model: object
    tokenizer: object
    model_dir: Path
    prompt_ids: np.ndarray  # model ids, BOS first
    constraint: object


def load_generator(path, infill: bool = False) -> tuple[object, object, Path]:
    """(MusicLM, its tokenizer, its model dir) from a run or model dir; with ``infill`` a MusicBERT too.

    MusefmError for anything else.
    """
    from musefm.data.tokenize import load_tokenizer
    from musefm.models.base import load_pretrained, read_model_config
    from musefm.training.checkpoint import resolve_model_dir

    if not Path(path).exists():
        raise MusefmError(f"{path}: no such run or model directory")
    model_dir = resolve_model_dir(path)
    family = read_model_config(model_dir)["family"]
    if family == "music-bert" and not infill:
        raise MusefmError(f"{path}: holds a music-bert model, not a generative music-lm (a music-bert can only "
                          f"infill: --infill I:J --prompt PIECE)")
    if family not in ("music-lm", "music-bert"):
        raise MusefmError(f"{path}: holds a {family} model, not a generative music-lm")
    tokenizer = load_tokenizer(model_dir / "tokenizer.json")
    model, _ = load_pretrained(model_dir)
    if family == "music-bert":
        from musefm.models.music_bert import octuple_fields

        label = model_dir / "tokenizer.json"
        if not tokenizer.is_multi_voc or list(octuple_fields(tokenizer)[1]) != list(model.config.field_vocab_sizes):
            raise MusefmError(f"{label}: its vocabularies do not match the music-bert model's fields")
    else:
        check_compatible(model, tokenizer, label=str(model_dir / "tokenizer.json"))
    return model.eval(), tokenizer, model_dir


def prompt_ids_from(tokenizer, spec: str | None, prompt_bars: int = 0) -> np.ndarray:
    """Model ids ``[BOS] + tokens`` of a prompt file or corpus id (its first ``prompt_bars`` bars), or ``[BOS]``."""
    from musefm.data.corpus import load_piece
    from musefm.data.tokenize import apply_bpe, encode

    if spec is None:
        if prompt_bars:
            raise MusefmError("prompt_bars: there is no prompt to take bars from")
        return np.array([BOS], dtype=np.int64)
    ids = np.asarray(encode(tokenizer, load_piece(spec).score, label=spec), dtype=np.int64)
    if prompt_bars:
        bar_ids = bar_token_ids(tokenizer)
        if not len(bar_ids):
            raise MusefmError(f"prompt_bars: counts Bar tokens, which {type(tokenizer).__name__} has none of")
        starts = np.flatnonzero(np.isin(ids, bar_ids))  # bar k starts at starts[k]
        if len(starts) > prompt_bars:
            ids = ids[: starts[prompt_bars]]
    return np.concatenate([[BOS], apply_bpe(tokenizer, ids)]).astype(np.int64)


def prepare(config: GenerateConfig) -> Plan:
    """Check everything (config, model, tokenizer, prompt, constraints); writes nothing."""
    from musefm.data.corpus import load_piece
    from musefm.generation.constraints import GrammarConstraint
    from musefm.generation.infill import num_bars, piece_ids, piece_programs

    config.validate()
    infill = config.infill_bars()
    model, tokenizer, model_dir = load_generator(config.model, infill=infill is not None)
    if config.bars and not len(bar_token_ids(tokenizer)):
        raise MusefmError(f"bars: counts Bar tokens, which {type(tokenizer).__name__} has none of; use seconds")
    if infill is not None:
        if not tokenizer.is_multi_voc and not len(bar_token_ids(tokenizer)):
            raise MusefmError(f"infill: counts Bar tokens, which {type(tokenizer).__name__} has none of (use REMI)")
        if model.family == "music-lm" and not config.constrained:
            raise MusefmError("infill: a music-lm infills under the token grammar (drop --no-constraint)")
        prompt_ids = piece_ids(tokenizer, load_piece(config.prompt).score, config.prompt, config.prompt_bars)
        bar_count = num_bars(tokenizer, prompt_ids)
        if infill[1] >= bar_count:
            raise MusefmError(f"infill: bars {config.infill} lie outside {config.prompt}, which has bars 1..{bar_count}")
        if model.family == "music-bert":
            return Plan(model, tokenizer, model_dir, prompt_ids, None)
        prompt_ids = np.concatenate([[BOS], prompt_ids]).astype(np.int64)
    else:
        prompt_ids = prompt_ids_from(tokenizer, config.prompt, config.prompt_bars)
    constraint = None
    if config.constrained:
        pitch_range = (config.pitch_low, config.pitch_high) if config.pitch_low is not None else None
        programs = config.programs
        if infill is not None and programs is None:  # infilled notes play the piece's instruments
            programs = piece_programs(tokenizer, prompt_ids)
        constraint = GrammarConstraint(tokenizer, key=config.key, pitch_range=pitch_range, programs=programs,
                                       time_signature=config.time_signature,
                                       max_notes_per_onset=config.max_notes_per_onset or None)
        try:
            constraint.start(prompt_ids)
        except MusefmError as error:
            raise MusefmError(f"{config.prompt}: the grammar rejects the prompt ({error})") from None
    return Plan(model, tokenizer, model_dir, prompt_ids, constraint)


def grammar_errors(tokenizer, ids) -> int | None:
    """MidiTok's count of grammar errors in model ids (None when the tokenizer has no such check)."""
    if not hasattr(tokenizer, "tokens_errors"):
        return None
    body = [int(i) for i in ids if int(i) not in tokenizer.special_tokens_ids]
    return round(float(tokenizer.tokens_errors(body)) * len(body)) if body else 0


def _write_music(score: Score, stem: Path, index: int, config: GenerateConfig, stream) -> tuple[str | None, str | None]:
    """``stem``.mid and, when asked and possible, ``stem``.wav; returns (audio file name, note on why none)."""
    from musefm.audio.render import render_midi

    score.dump_midi(str(stem.with_suffix(".mid")))
    if not config.render:
        return None, None
    try:
        return render_midi(stem.with_suffix(".mid"), stem.with_suffix(".wav")).name, None
    except MusefmError as error:
        print(f"sample {index}: no audio: {error}", file=stream)
        return None, f"no audio: {error}"


def write_sample(sample: Sample, index: int, out: Path, plan: Plan, config: GenerateConfig, stream) -> Path:
    """The MIDI, WAV, PNG and JSON files of one sample; returns the JSON path."""
    from musefm.viz.pianoroll import plot_pianoroll

    stem = out / f"sample_{index:02d}"
    prompt_score = decode_ids(plan.tokenizer, sample.ids[: sample.prompt_length])
    score = sample.score
    audio, audio_note = _write_music(score, stem, index, config, stream)
    has_prompt = config.prompt is not None
    prompt_end = prompt_score.end() / prompt_score.ticks_per_quarter if has_prompt else None
    title = (f"{Path(str(config.prompt)).name}: prompt, then {len(sample.new_ids)} generated tokens" if has_prompt
             else f"from scratch: {len(sample.new_ids)} generated tokens")
    plot_pianoroll(score, stem.with_suffix(".png"), title=title, highlight_from_quarter=prompt_end)
    new_bars = int(np.isin(music_ids(plan.tokenizer, sample.new_ids), bar_token_ids(plan.tokenizer)).sum())
    seconds, prompt_seconds = seconds_of(score), seconds_of(prompt_score)
    record = {
        "settings": to_dict(config),
        "seed": sample.seed,
        "model_dir": str(plan.model_dir),
        "prompt": {"source": config.prompt, "bars": config.prompt_bars, "tokens": sample.prompt_length},
        "stopped": sample.stopped,
        "num_tokens": len(sample.new_ids),
        "token_ids": [int(i) for i in sample.new_ids],
        "log_probs": [round(float(p), 6) for p in sample.log_probs],
        "mean_log_prob": float(np.mean(sample.log_probs)) if len(sample.log_probs) else None,
        "new_bars": new_bars,
        "notes": score.note_num(),
        "generated_notes": score.note_num() - prompt_score.note_num(),
        "seconds": round(seconds, 4),
        "generated_seconds": round(seconds - prompt_seconds, 4),
        "grammar_errors": grammar_errors(plan.tokenizer, sample.ids),
        "files": {"midi": stem.with_suffix(".mid").name, "audio": audio, "pianoroll": stem.with_suffix(".png").name},
        "audio_note": audio_note,
    }
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(record, indent=2))
    return path


def write_infill(result, index: int, out: Path, plan: Plan, config: GenerateConfig, stream) -> Path:
    """The MIDI, WAV, PNG (the infilled bars shaded, their notes drawn as their own part) and JSON files of
    one infilled piece."""
    from musefm.generation.infill import notes_between, piece_ids
    from musefm.viz.pianoroll import plot_pianoroll

    stem = out / f"sample_{index:02d}"
    score, tokenizer = result.score, plan.tokenizer
    audio, audio_note = _write_music(score, stem, index, config, stream)
    first, last = (bar + 1 for bar in result.bars)
    start, end = result.quarters()
    plot_pianoroll(result.marked_score(), stem.with_suffix(".png"),
                   title=f"{Path(str(config.prompt)).name}: bars {first}-{last} infilled ({result.method})",
                   highlight_from_quarter=start, highlight_to_quarter=end, highlight_label="infilled")
    new_ids = result.ids[result.span[0] : result.span[1]]
    record = {
        "settings": to_dict(config),
        "seed": result.seed,
        "model_dir": str(plan.model_dir),
        "model_family": plan.model.family,
        "prompt": {"source": config.prompt, "bars": config.prompt_bars, "tokens": len(plan.prompt_ids)},
        "infill": {"bars": [first, last], "quarters": [start, end], "method": result.method, **result.details},
        "num_tokens": len(new_ids),
        "token_ids": new_ids.tolist(),  # Octuple: one row of field ids per note
        "log_probs": [round(float(p), 6) for p in result.log_probs],
        "mean_log_prob": float(np.mean(result.log_probs)) if len(result.log_probs) else None,
        "notes": score.note_num(),
        "generated_notes": notes_between(score, start, end),
        "replaced_notes": notes_between(decode(tokenizer, piece_ids(tokenizer, plan.prompt_ids)), start, end),
        "seconds": round(seconds_of(score), 4),
        "grammar_errors": None if tokenizer.is_multi_voc else grammar_errors(tokenizer, result.ids),
        "files": {"midi": stem.with_suffix(".mid").name, "audio": audio, "pianoroll": stem.with_suffix(".png").name},
        "audio_note": audio_note,
    }
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(record, indent=2))
    return path


def infill_main(plan: Plan, config: GenerateConfig, stream) -> list[Path]:
    """``config.num_samples`` infillings of the prompt's bars (sample ``k``: seed ``seed + k``) into ``config.out``."""
    from musefm.generation.infill_bert import infill_music_bert
    from musefm.generation.infill_lm import infill_music_lm

    bars = config.infill_bars()
    sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p)
    results = []
    for k in range(config.num_samples):
        if plan.model.family == "music-bert":
            pitch_range = (config.pitch_low, config.pitch_high) if config.pitch_low is not None else None
            results.append(infill_music_bert(plan.model, plan.tokenizer, plan.prompt_ids, bars,
                                             iterations=config.infill_iterations, seed=config.seed + k, key=config.key,
                                             pitch_range=pitch_range, programs=config.programs, **sampling))
        else:
            results.append(infill_music_lm(plan.model, plan.tokenizer, plan.prompt_ids, bars,
                                           num_candidates=config.infill_candidates, seed=config.seed + k,
                                           constraint=plan.constraint, **sampling))
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, result in enumerate(results):
        paths.append(write_infill(result, index, out, plan, config, stream))
        print(f"sample {index}: bars {config.infill} infilled ({result.method}), {result.span[1] - result.span[0]} new "
              f"{'notes' if plan.tokenizer.is_multi_voc else 'tokens'} -> {paths[-1].with_suffix('.mid')}", file=stream)
    return paths


def main(config: GenerateConfig, stream=None) -> list[Path]:
    """Generate ``config.num_samples`` pieces into ``config.out``; returns the sample JSON paths."""
    stream = stream or sys.stderr
    plan = prepare(config)
    if config.infill is not None:
        return infill_main(plan, config, stream)
    max_tokens, bars, seconds = config.stop_rules()
    samples = generate_samples(plan.model, plan.tokenizer, plan.prompt_ids, num_samples=config.num_samples,
                               max_tokens=max_tokens, bars=bars, seconds=seconds, temperature=config.temperature,
                               top_k=config.top_k, top_p=config.top_p, seed=config.seed, beam=config.beam,
                               constraint=plan.constraint)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, sample in enumerate(samples):
        paths.append(write_sample(sample, index, out, plan, config, stream))
        print(f"sample {index}: {len(sample.new_ids)} new tokens ({sample.stopped}), {sample.score.note_num()} notes "
              f"-> {paths[-1].with_suffix('.mid')}", file=stream)
    return paths
