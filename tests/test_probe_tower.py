"""train/probe_tower.py: the scenes and labels of each task, a tower that learns from them, both kinds of
checkpoint it reads, and the table and JSON it reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from scripts import ROOT, load_script

from vlm.data import scenes
from vlm.model import load_vision_tower

probe_tower = load_script("probe_tower")
SIGLIP = str(ROOT / "vlm" / "default_siglip")
# The shipped SigLIP tower, 40 steps on 240 one-shape scenes, 80 held out: colour, learnt in seconds.
SMALL_COLOR_RUN = [
    SIGLIP,
    "--task",
    "color",
    "--steps",
    "40",
    "--batch-size",
    "32",
    "--train",
    "240",
    "--test",
    "80",
]


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLM_CACHE", str(tmp_path / "vlm-cache"))


def test_each_task_draws_its_scenes_and_labels() -> None:
    for task in ("shape", "color"):
        drawn = probe_tower.task_scenes(task, "test", 30)
        assert all(len(s.objects) == 1 and s.objects[0].is_shape and not s.cluttered for s in drawn)
        assert drawn[0].seed == scenes.TEST_SEED
        answer, group = probe_tower.labels(task, drawn[0])
        thing = drawn[0].objects[0]
        assert answer == (thing.name if task == "shape" else thing.color) and group == thing.size
    words = probe_tower.task_scenes("word", "test", 20)
    assert all(len(s.words) == 1 and s.seed >= scenes.TEST_SEED for s in words)
    assert len({s.seed for s in words}) == 20 and any(s.words[0].sign for s in words)
    text = words[0].words[0].text
    assert probe_tower.labels("word", words[0]) == (text, f"{len(text)} letters")
    counted = probe_tower.task_scenes("count", "train", 200)
    assert {len(s.objects) for s in counted} == set(range(1, 9)) and not any(s.cluttered for s in counted)
    assert [probe_tower.labels("count", s)[0] for s in counted[:5]] == [
        str(len(s.objects)) for s in counted[:5]
    ]


def test_a_tower_learns_colours_and_the_report_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shipped SigLIP tower, 40 steps on 240 one-shape scenes: colour is easy, so it must be learnt well
    above the 10% of chance (a broken label, head or optimiser step stays near chance)."""
    out, plot = tmp_path / "probe.json", tmp_path / "curve.png"
    assert (
        probe_tower.main([*SMALL_COLOR_RUN, "--eval-every", "15", "--out", str(out), "--plot", str(plot)])
        == 0
    )
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert report["task"] == "color" and result["model"] == SIGLIP and result["image_size"] == 64
    assert result["accuracy"] > 0.5
    assert result["by_group"] and result["samples_per_s"] > 0
    assert list(result["by_group"]) == [size for size in scenes.SIZES if size in result["by_group"]]
    # the learning curve: every 15 steps of 32 and the last step, the last point the table's accuracy
    curve = result["curve"]
    assert [(p["step"], p["samples"]) for p in curve] == [(15, 480), (30, 960), (40, 1280)]
    assert curve[-1]["accuracy"] == result["accuracy"] and all(0 <= p["accuracy"] <= 1 for p in curve)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| model | input | color |" in printed and f"{100 * result['accuracy']:.1f}%" in printed
    assert "| model: color after N samples | 480 | 960 | 1,280 |" in printed


def test_a_frozen_tower_is_read_by_the_head_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--frozen: the tower's weights are what it loaded, and a linear head on its pooled patches still reads
    colour well above chance (10%)."""
    tower, processor = load_vision_tower(SIGLIP)
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    drawn = probe_tower.task_scenes("color", "train", 240) + probe_tower.task_scenes("color", "test", 80)
    answers = [probe_tower.labels("color", s)[0] for s in drawn]
    targets = torch.tensor([sorted(set(answers)).index(a) for a in answers])
    pixels = processor([scenes.render(s) for s in drawn])
    predicted = probe_tower.probe(tower, pixels, targets, 240, 200, 32, 1e-2, 0, frozen=True)[200]
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())
    assert (predicted == targets[240:]).float().mean() > 0.5
    out = tmp_path / "probe.json"
    argv = [SIGLIP, "--task", "color", "--steps", "5", "--train", "40", "--test", "20", "--frozen"]
    assert probe_tower.main([*argv, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["frozen"] is True
    assert f"| {SIGLIP} (frozen) |" in capsys.readouterr().out


def test_a_vlm_folder_gives_its_own_tower_and_processor(default_model) -> None:
    tower, processor = load_vision_tower(str(ROOT / "vlm" / "default_model"))
    for ours, shipped in zip(
        tower.state_dict().values(), default_model.vision.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, shipped)
    image = scenes.render(scenes.generate(0))
    assert torch.equal(processor(image), default_model.processor(image))
    siglip, _ = load_vision_tower(SIGLIP)
    assert siglip.config.image_size == 64


def test_a_tower_reads_larger_images_with_its_position_grid_resized(tmp_path: Path) -> None:
    """--image-size 128 on the 64-px tower: 4x the patches, and colour still learnt (a tower fed the wrong
    grid would fail in the forward pass; one that ignored the flag would report 64 px)."""
    out = tmp_path / "probe.json"
    # 4x the patches cost ~4x a step: fewer, smaller steps (24 of 16 read colour at 98.8% here, 61 s instead of
    # 156 s for SMALL_COLOR_RUN's 40 of 32, on 2 cores of an AMD EPYC)
    run = [*SMALL_COLOR_RUN, "--steps", "24", "--batch-size", "16", "--image-size", "128", "--out", str(out)]
    assert probe_tower.main(run) == 0
    (result,) = json.loads(out.read_text())["results"]
    assert result["image_size"] == 128 and result["patch_size"] == 8 and result["accuracy"] > 0.5
    with pytest.raises(SystemExit):
        probe_tower.main([*SMALL_COLOR_RUN, "--image-size", "100"])  # not a whole number of 8-px patches


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        probe_tower.main([SIGLIP, "--steps", "0"])
    with pytest.raises(SystemExit):
        probe_tower.main([SIGLIP, "--task", "size"])
    with pytest.raises(SystemExit):
        probe_tower.main([SIGLIP, "--eval-every", "-1"])
