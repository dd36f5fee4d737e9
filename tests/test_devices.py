"""vlm.devices and `--device`: "auto" picks the GPU when one is visible and the CPU otherwise, a device the
machine lacks is refused with one clear line before any model loads, and every command hands the resolved
device to its real loader (the tiny models run; a spy keeps what each loader was given and returned).

The GPU itself is pretended (torch.cuda's queries monkeypatched) and nothing is moved to it; tests/test_gpu.py
checks models that really land on CUDA."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlm.model
import vlm.weights
import vlm.zeroshot
from vlm.checks import InvalidValue
from vlm.cli import main
from vlm.devices import DeviceUnavailable, default_dtype, resolve_device, resolve_dtype, same_device

CPU = torch.device("cpu")
NO_CUDA = "no CUDA device is visible here (torch.cuda.is_available() is False); use cpu or auto"


@pytest.fixture
def no_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without a GPU, whatever it has: "auto" must then mean the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.cuda's answers on a machine with two bf16-capable GPUs (nothing is put on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


# -- resolve_device, default_dtype ------------------------------------------------------------------------------


def test_auto_is_the_cpu_on_a_machine_without_an_accelerator(no_accelerator) -> None:
    assert resolve_device("auto") == resolve_device(None) == resolve_device(" Auto ") == CPU
    assert resolve_device("cpu") == resolve_device(CPU) == resolve_device("cpu:0") == CPU
    assert default_dtype(CPU) is resolve_dtype("auto", CPU) is resolve_dtype(None, CPU) is torch.float32
    assert (
        resolve_dtype("bfloat16", CPU) is torch.bfloat16
        and resolve_dtype(torch.float16, CPU) is torch.float16
    )


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1", torch.device("cuda", 0)])
def test_cuda_is_refused_where_none_is_visible(no_accelerator, spec) -> None:
    with pytest.raises(DeviceUnavailable) as caught:
        resolve_device(spec, "--device")
    assert isinstance(caught.value, InvalidValue) and isinstance(caught.value, ValueError)
    assert str(caught.value) == f"--device {str(spec).lower()!r}: {NO_CUDA}"


def test_mps_is_refused_where_it_is_absent(no_accelerator) -> None:
    with pytest.raises(
        DeviceUnavailable, match=r"^device 'mps': no Apple MPS device is here .*; use cpu or auto$"
    ):
        resolve_device("mps")


@pytest.mark.parametrize("junk", ["gpu", "cuda:x", "", "cpu:1", "meta", "xla", "cuda 0"])
def test_anything_else_is_refused_with_the_accepted_forms(junk) -> None:
    with pytest.raises(InvalidValue) as caught:
        resolve_device(junk, "--device")
    assert str(caught.value) == f"--device must be auto, cpu, cuda, cuda:N or mps, got {junk!r}"
    with pytest.raises(InvalidValue, match="dtype must be auto, float32, bfloat16, float16, got 'float64'"):
        resolve_dtype("float64", CPU)


def test_with_a_gpu_auto_is_cuda_0_in_bfloat16(two_gpus, monkeypatch) -> None:
    assert (
        resolve_device("auto")
        == resolve_device("cuda")
        == resolve_device("CUDA:0")
        == torch.device("cuda", 0)
    )
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == CPU  # asked for, the CPU is still there
    with pytest.raises(DeviceUnavailable) as caught:
        resolve_device("cuda:2", "--device")
    assert (
        str(caught.value)
        == "--device 'cuda:2': this machine has 2 CUDA devices; use cuda:0 to cuda:1, or auto"
    )
    assert default_dtype(resolve_device("auto")) is resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("float32", "cuda:0") is torch.float32
    assert (
        same_device("cuda", "cuda:0") and not same_device("cuda:1", "cuda") and not same_device(CPU, "cuda:0")
    )

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert default_dtype("cuda:0") is torch.float32  # a pre-Ampere GPU: float32, never float16's range
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceUnavailable, match="has 1 CUDA device; use cuda:0, or auto$"):
        resolve_device("cuda:1")


# -- every command: --device cpu / auto reach the real loader; --device cuda stops before it -------------------


@pytest.fixture(scope="module")
def files(parts, tmp_path_factory) -> Path:
    return write_files(parts, tmp_path_factory.mktemp("devices"))


def write_files(parts, root: Path) -> Path:
    """A tiny vision checkpoint, a tiny VLM (its LM in a folder beside it), a picture and a VQA file, in `root`
    (tests/test_gpu.py runs the same commands on them)."""
    from tiny import VISION, build

    from vlm.siglip import SiglipVisionEncoder

    torch.manual_seed(0)
    vlm.weights.save_vision_encoder(SiglipVisionEncoder(VISION), root / "vision")
    build(parts).save_pretrained(root / "m")
    parts[0].save_pretrained(root / "lm")
    parts[1].save_pretrained(root / "lm")
    config = json.loads((root / "m" / "config.json").read_text())
    (root / "m" / "config.json").write_text(json.dumps({**config, "lm_source": str(root / "lm")}))
    Image.new("RGB", (40, 30), (220, 30, 30)).save(root / "picture.png")
    (root / "vqa.jsonl").write_text(
        json.dumps({"image": "picture.png", "question": "Colour?", "answers": "red"}) + "\n"
    )
    return root


def argv_of(command: str, files: Path, out: Path) -> list[str]:
    picture, m, vision = str(files / "picture.png"), str(files / "m"), str(files / "vision")
    return {
        "embed": ["embed", picture, "--model", vision, "--out", str(out / "e.safetensors")],
        "viz": ["viz", "--model", vision, "--out", str(out / "viz")],
        "ask": ["ask", "What is it?", "--model", m, "--image", picture, "--max-new-tokens", "2"],
        "chat": ["chat", "--model", m],
        "eval": ["eval", m, "--data", str(files / "vqa.jsonl")],
        "zeroshot": ["zeroshot", picture, "--labels", "a circle,a rectangle"],  # the shipped dual encoder
        "demo": ["demo", "--model", m, "--port", "0"],
    }[command]


def spy(monkeypatch: pytest.MonkeyPatch, command: str) -> list[tuple[torch.device | None, torch.nn.Module]]:
    """(device given, model returned) of each call of the command's loader; the real loader runs."""
    calls = []
    if command in ("embed", "viz", "zeroshot"):
        owner, name = (vlm.zeroshot, "load_dual_encoder") if command == "zeroshot" else (vlm.weights, "load_vision_encoder")  # fmt: skip
        real = getattr(owner, name)

        def load(*args, **kwargs):
            loaded = real(*args, **kwargs)
            calls.append((kwargs.get("device"), loaded[0] if isinstance(loaded, tuple) else loaded))
            return loaded

        monkeypatch.setattr(owner, name, load)
        return calls
    real_from_pretrained = vlm.model.VisionLanguageModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        calls.append((kwargs.get("device"), real_from_pretrained(cls, *args, **kwargs)))
        return calls[-1][1]

    monkeypatch.setattr(vlm.model.VisionLanguageModel, "from_pretrained", classmethod(from_pretrained))
    return calls


class NoPage:
    """Stands in for the Gradio page in `vlm demo`: the loading and the handlers are real, nothing is served."""

    def launch(self, **kwargs) -> tuple[None, str, None]:
        return None, "http://127.0.0.1:0/", None

    def block_thread(self) -> None:  # the real one waits for Ctrl-C
        pass

    def close(self) -> None:
        pass


COMMANDS = ["embed", "viz", "ask", "chat", "eval", "zeroshot", "demo"]


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_loads_its_model_on_the_resolved_device(
    command, device, files, tmp_path, monkeypatch, no_accelerator
) -> None:
    calls = spy(monkeypatch, command)
    if command == "chat":
        monkeypatch.setattr(sys, "stdin", io.StringIO("/quit\n"))
    if command == "demo":
        import demo.app

        monkeypatch.setattr(demo.app, "build_app", lambda handlers, info: NoPage())
    assert main([*argv_of(command, files, tmp_path), "--device", device]) == 0
    assert calls and all(given == CPU for given, _ in calls)  # "auto" arrives resolved
    assert all({p.device for p in model.parameters()} == {CPU} for _, model in calls)


@pytest.mark.parametrize("command", COMMANDS)
def test_device_cuda_without_a_gpu_is_one_line_before_anything_loads(
    command, files, tmp_path, monkeypatch, capsys, no_accelerator
) -> None:
    calls = spy(monkeypatch, command)
    assert main([*argv_of(command, files, tmp_path), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == f"vlm {command}: error: --device 'cuda': {NO_CUDA}\n"
    assert calls == [] and not (tmp_path / "viz").exists()


def test_quantize_off_the_gpu_is_refused_before_the_lm_loads(files, monkeypatch, capsys) -> None:
    """bitsandbytes puts a quantized LM on the GPU whenever one is visible, so `--device cpu` cannot hold."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nothing asks more of the pretended GPU
    calls = spy(monkeypatch, "ask")
    argv = ["ask", "What is it?", "--model", str(files / "m"), "--device", "cpu", "--quantize", "4bit"]
    assert main(argv) == 2
    assert calls == [] and "--quantize loads the LM on the GPU when one is visible" in capsys.readouterr().err


def test_a_quantized_lm_elsewhere_than_asked_is_refused(files, no_accelerator) -> None:
    """The library's side: a quantized LM stays where bitsandbytes put it (here the CPU), and the rest of the
    model follows it; a different device is an error that says where the LM is, not a model split in two."""
    pytest.importorskip("bitsandbytes")
    with pytest.raises(ValueError, match=r"bitsandbytes placed the quantized LM on cpu, not on cuda:0"):
        vlm.model.VisionLanguageModel.from_pretrained(files / "m", quantization="8bit", device="cuda:0")


@pytest.mark.parametrize("native", [True, False])
def test_training_uses_bf16_only_where_the_hardware_has_it(native, monkeypatch, capsys) -> None:
    """Emulated bf16 (an AVX2-only CPU) is ~100x slower than float32: a run asking for bf16 trains in float32
    there, and says so."""
    from needs import pin_cpu

    import vlm.devices
    from vlm.training import make_accelerator

    pin_cpu(monkeypatch)
    monkeypatch.setattr(vlm.devices, "native_bf16", lambda device: native)
    accelerator = make_accelerator(bf16=True, seed=0)
    assert accelerator.mixed_precision == ("bf16" if native else "no")
    said = "no bf16 units" in capsys.readouterr().out
    assert said == (not native)
    pin_cpu(monkeypatch)  # accelerate's process-wide state reset for the next test
