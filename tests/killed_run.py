"""`python tests/killed_run.py STEP CONFIG [--key=value ...]`: train/finetune.py, SIGKILLed by itself half-way
through saving the checkpoint of step STEP (its model files written, the rest of the checkpoint not).

A deterministic stand-in for a machine that dies at the worst moment: an outside kill timed by polling for
files can come too late (the run already over) on a fast machine. The kill is the same signal, which no code
can catch; only the moment is fixed. Nothing here touches the script's code paths other than wrapping the
function that writes the model into a checkpoint folder."""

from __future__ import annotations

import os
import signal
import sys

from scripts import load_script

ft = load_script("finetune")
at_step = int(sys.argv[1])
write_model = ft.save_vlm


def write_model_then_die(run, folder) -> None:  # noqa: ANN001
    write_model(run, folder)
    if run.step == at_step and folder.name.startswith(".tmp-"):  # a checkpoint in the making, not final/
        os.kill(os.getpid(), signal.SIGKILL)


ft.save_vlm = write_model_then_die
raise SystemExit(ft.main(sys.argv[2:]))
