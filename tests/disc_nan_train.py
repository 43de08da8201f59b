"""Run by test_tokenizer_train.py under the deepspeed launcher: unitok.train with the discriminator's loss made
non-finite on one micro batch (the first of step 3, --grad-accum 2); each step's record notes the discriminator
engine's micro and optimizer steps, which must stay on the generator's accumulation boundary."""
import sys

import unitok.train as T

state = {"done": False}
losses = T.TokenizerTask.discriminator_losses
after_step = T.TokenizerTask.after_step


def nan_once(self, batch, rec, step):
    out = losses(self, batch, rec, step)
    if out and step == 2 and not state["done"]:
        state["done"] = True
        out = {**out, "total": out["total"] * float("nan")}
    return out


def note_counters(self, step, record, batch, out):
    after_step(self, step, record, batch, out)
    record["disc_micro_steps"], record["disc_global_steps"] = self.disc_engine.micro_steps, self.disc_engine.global_steps


T.TokenizerTask.discriminator_losses = nan_once
T.TokenizerTask.after_step = note_counters
T.main(sys.argv[1:])
