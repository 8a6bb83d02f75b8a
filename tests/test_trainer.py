"""ZOTrainer: zo_fx optimizers driven by the Hugging Face Trainer."""

import pytest
import torch
from model_zoo import causal_batch, tiny_llama
from transformers import TrainingArguments

import zo_fx


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, n):
        self.items = []
        for i in range(n):
            b = causal_batch(1, 7, seed=i, pad_tail=False)
            self.items.append({k: v[0] for k, v in b.items()})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, lr_scheduler_type="linear",
                per_device_eval_batch_size=2, seed=5, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("method", ["fzoo", "mezo", "adamezo"])
def test_trainer_runs_zo_steps_with_the_trainers_schedule(method, tmp_path):
    model = tiny_llama(torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {"n_directions": 3} if method == "fzoo" else {"horizon": 2} if method == "adamezo" else {}
    trainer = zo_fx.ZOTrainer(model=model, args=_args(tmp_path), train_dataset=_ListDataset(8),
                              eval_dataset=_ListDataset(4), zo_method=method, zo_kwargs=kwargs)
    result = trainer.train()
    opt = trainer.zo_optimizer
    assert opt.step_count == 4 and len(opt.trajectory) == 4
    lrs = [r["lr"] for r in opt.trajectory.records]
    assert lrs[0] == pytest.approx(1e-3) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 1e-3  # linear decay
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert torch.isfinite(torch.tensor(result.training_loss))
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics
    # the trained weights are the base model plus the recorded updates
    replayed = zo_fx.replay(tiny_llama(torch.float32), opt.trajectory)
    assert all(torch.equal(p, dict(replayed.named_parameters())[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("method", ["mezo", "zoadam"])
def test_trainer_checkpoint_resume_restores_the_zo_state(tmp_path, method):
    model = tiny_llama(torch.float32)
    args = _args(tmp_path, save_strategy="steps", save_steps=2, max_steps=4)
    zo_fx.ZOTrainer(model=model, args=args, train_dataset=_ListDataset(8), zo_method=method).train()
    straight = {n: p.detach().clone() for n, p in model.named_parameters()}

    resumed_model = tiny_llama(torch.float32)
    trainer = zo_fx.ZOTrainer(model=resumed_model, args=args, train_dataset=_ListDataset(8), zo_method=method)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert trainer.zo_optimizer.step_count == 4
    assert all(torch.equal(straight[n], p) for n, p in resumed_model.named_parameters())


def test_unknown_method():
    with pytest.raises(ValueError, match="zo_method"):
        zo_fx.ZOTrainer(model=tiny_llama(torch.float32), args=_args("/tmp/unused"), zo_method="sgd")
