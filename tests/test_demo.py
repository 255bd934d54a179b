from musefm.cli import main


def test_quick_demo_writes_dataset_card_and_report(tmp_path, cache_dir, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "held-out" in report and (out / "heldout_pianoroll.png").stat().st_size > 5000
    card = (out / "data" / "card.md").read_text()
    assert "bach" in card and "oneills1850" in card
    assert "demo written to" in capsys.readouterr().out
