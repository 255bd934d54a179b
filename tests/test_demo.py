from musefm.cli import main


def test_quick_demo_writes_dataset_card_and_report(tmp_path, cache_dir, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Pretraining" in report and "## A continuation" in report and "Validation loss" in report
    for name in ("continuation.png", "loss_curve.png"):
        assert (out / name).stat().st_size > 5000, name
    assert (out / "continuation.mid").stat().st_size > 50
    assert "## Back from audio" in report
    if "note F1" in report:  # FluidSynth present: the shipped transcriber heard the continuation
        assert (out / "continuation.transcribed.mid").is_file()
    assert (out / "lm" / "best" / "model.safetensors").is_file()
    card = (out / "data" / "card.md").read_text()
    assert "bach" in card and "oneills1850" in card
    assert "demo written to" in capsys.readouterr().out
