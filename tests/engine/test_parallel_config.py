"""Scale-out pieces that need one process: the DeepSpeed section's resolution (one source of truth, errors that show
the arithmetic), the shipped configs, the missing-package error, the sharded-EMA bookkeeping, failure classification
and process-group timeouts."""

import copy
import datetime
import glob
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist

from repa_fast.cli import main, resolve_config
from repa_fast.config import ConfigError, TrainConfig
from repa_fast.engine import parallel as P
from repa_fast.engine.ema import EMA, FullReplica, ShardedEMA
from repa_fast.engine.parallel import process_group as PG
from repa_fast.engine.parallel.ddp import DDPBackend
from repa_fast.engine.parallel.dsconfig import check_resolved, resolve_deepspeed_config
from repa_fast.models.sit import build_sit

from .helpers import REPO, tiny_args

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "ds_sit_*.json")))
RECIPE = {
    "enc_type": "dinov2-vit-b",
    "proj_coeff": 0.5,
    "path_type": "linear",
    "prediction": "v",
    "weighting": "uniform",
    "batch_size": 256,
    "gradient_accumulation_steps": 1,
    "learning_rate": 1e-4,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_epsilon": 1e-8,
    "adam_weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "ema_decay": 0.9999,
    "mixed_precision": "bf16",
    "cfg_prob": 0.1,
    "parallel": "deepspeed",
}


def _cfg(batch=256, accum=1, clip=1.0, mp="bf16", ds=None):
    cfg = TrainConfig()
    cfg.optim.batch_size, cfg.optim.gradient_accumulation_steps, cfg.optim.max_grad_norm = batch, accum, clip
    cfg.run.mixed_precision = mp
    cfg.deepspeed = ds
    return cfg


def test_six_shipped_configs():
    names = sorted(os.path.basename(p) for p in CONFIGS)
    assert names == [f"ds_sit_{s}{r}.json" for s in ("b", "l", "xl") for r in ("", "_512")]


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("world", [1, 8, 32])
def test_shipped_config_resolves_to_the_reference_recipe(path, world, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg, _ = resolve_config(["--config", path])
    flat, name = cfg.flat(), os.path.basename(path)
    size = name.split("_")[2].split(".")[0]
    assert {k: flat[k] for k in RECIPE} == RECIPE
    assert flat["model"] == {"b": "SiT-B/2", "l": "SiT-L/2", "xl": "SiT-XL/2"}[size]
    assert flat["encoder_depth"] == (4 if size == "b" else 8)
    assert flat["resolution"] == (512 if "_512" in name else 256)
    ds = cfg.deepspeed
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (256, 1, 1.0)
    assert ds["train_micro_batch_size_per_gpu"] == 256 // world  # "auto" in the file, derived from the trainer
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert ds["zero_optimization"]["stage"] in (1, 2, 3) and ds["managed_gradient_accumulation"] is False
    assert "bf16" not in ds and "fp16" not in ds and "optimizer" not in ds


def test_cli_flags_override_the_files_numbers(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    xl = os.path.join(REPO, "configs", "ds_sit_xl.json")
    cfg, _ = resolve_config(
        [
            "--config",
            xl,
            "--batch-size",
            "512",
            "--gradient-accumulation-steps",
            "2",
            "--max-grad-norm",
            "0.5",
            "--mixed-precision",
            "no",
        ]
    )
    ds = cfg.deepspeed
    assert (ds["train_batch_size"], ds["gradient_accumulation_steps"], ds["train_micro_batch_size_per_gpu"]) == (
        512,
        2,
        32,
    )
    assert ds["gradient_clipping"] == 0.5 and ds["torch_autocast"] == {"enabled": False}
    assert cfg.optim.batch_size == 512 and cfg.run.mixed_precision == "no"


@pytest.mark.parametrize(
    "ds,world,message",
    [
        (
            {"train_micro_batch_size_per_gpu": 32},
            4,
            "train_micro_batch_size_per_gpu 32 x gradient_accumulation_steps 1 x 4 process(es) = 128 "
            "!= train_batch_size 256",
        ),
        ({"train_batch_size": 128}, 1, "train_batch_size 128 != trainer batch_size 256"),
        (
            {"gradient_accumulation_steps": 2},
            1,
            "gradient_accumulation_steps 2 != trainer gradient_accumulation_steps 1",
        ),
        ({}, 3, "train_batch_size 256 is not divisible by gradient_accumulation_steps 1 x 3 process(es) = 3"),
        ({"train_micro_batch_size_per_gpu": 0}, 1, "must be a positive integer"),
        ({"gradient_clipping": 2.0}, 1, "gradient_clipping 2.0 != trainer max_grad_norm 1.0"),
        ({"bf16": {"enabled": True}}, 1, '"torch_autocast": {"enabled": true, "dtype": "bfloat16"}'),
        ({"fp16": {"enabled": True}}, 1, "deepspeed.fp16 stores fp16 weights"),
        (
            {"torch_autocast": {"enabled": True, "dtype": "float16"}},
            1,
            "torch_autocast says fp16 but the trainer's mixed_precision is bf16",
        ),
        ({"optimizer": {"type": "AdamW"}}, 1, "the trainer section owns the optimizer"),
        ({"scheduler": {"type": "WarmupLR"}}, 1, 'Remove the "scheduler" section'),
        ({"zero_optimization": {"stage": 0}}, 1, "use --parallel ddp"),
        ({"zero_optimization": {"stage": 4}}, 1, "stage must be 1, 2 or 3"),
        ({"managed_gradient_accumulation": True}, 1, "the training loop owns the accumulation boundary"),
        ({"zero_optimization": {"stage": 1, "overlap_comm": True}}, 1, "overlap_comm needs stage 2 or 3"),
    ],
)
def test_inconsistent_deepspeed_section_is_an_error_that_shows_why(ds, world, message):
    with pytest.raises(ConfigError) as e:
        resolve_deepspeed_config(_cfg(ds=ds), world, where="--config x.json")
    assert message in str(e.value) and "--config x.json" in str(e.value)


def test_fp16_is_refused_with_the_measured_reason():
    with pytest.raises(ConfigError, match="clips the loss-scaled gradients.*ddp / fsdp"):
        resolve_deepspeed_config(_cfg(mp="fp16"), 2)


def test_consistent_numbers_pass_and_resolution_is_idempotent():
    ds = {
        "train_batch_size": 256,
        "train_micro_batch_size_per_gpu": 16,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1000},
        "torch_autocast": {"enabled": True, "dtype": "bf16"},
    }
    out = resolve_deepspeed_config(_cfg(accum=2, ds=copy.deepcopy(ds)), 8)
    assert out["train_micro_batch_size_per_gpu"] == 16 and out["gradient_accumulation_steps"] == 2
    assert out["zero_optimization"] == {"stage": 3, "stage3_max_live_parameters": 1000}  # user keys kept
    assert out["torch_autocast"]["dtype"] == "bfloat16"
    cfg = _cfg(accum=2, ds=out)
    assert resolve_deepspeed_config(cfg, 8) == out  # idempotent: a written config.json resolves to itself


def test_dry_run_without_deepspeed_section_derives_everything(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main([*tiny_args("/tmp/unused"), "--parallel", "deepspeed", "--dry-run"]) == 0
    import json

    ds = json.loads(capsys.readouterr().out)["deepspeed"]
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["zero_optimization"]) == (
        8,
        4,
        {"stage": 2},
    )


def test_dry_run_prints_once_under_a_launcher(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    assert main([*tiny_args("/tmp/unused"), "--dry-run"]) == 0
    assert capsys.readouterr().out == ""  # rank 0 prints


def test_missing_deepspeed_is_an_error_naming_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    assert main(tiny_args(tmp_path, "--parallel", "deepspeed")) == 2
    err = capsys.readouterr().err
    assert "pip install 'repa_fast[deepspeed]'" in err and not dist.is_initialized()


def test_make_backend_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown"):
        P.make_backend("zero", "cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="--parallel none with WORLD_SIZE=2"):
        P.make_backend("none", "cpu")


def _tiny_sit():
    torch.manual_seed(0)
    return build_sit(
        "SiT-T/4",
        input_size=16,
        in_channels=3,
        num_classes=10,
        z_dims=[32],
        encoder_depth=2,
        projector_dim=64,
        use_rope=True,
    )  # rope: non-persistent buffers too


def test_full_replica_rebuilds_the_model_without_holding_its_weights():
    model = _tiny_sit()
    replica = FullReplica(model)
    assert all(p.device.type == "meta" for p in replica.skeleton.parameters())
    assert "pos_embed" in replica.fixed and not any(n in replica.fixed for n in replica.trainable)
    trained = {n: p.detach() + 0.01 * torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    rebuilt = replica.materialize(trained, torch.device("cpu"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in trained:
                p.copy_(trained[n])
    assert replica.state_dict(trained).keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(replica.state_dict(trained)[k], v), k
    x, t, y = torch.randn(3, 3, 16, 16), torch.rand(3), torch.tensor([1, 4, 9])
    with torch.no_grad():
        assert torch.equal(rebuilt(x, t, y)[0], model.eval()(x, t, y)[0])
    assert not rebuilt.training and not any(p.requires_grad for p in rebuilt.parameters())


def test_sharded_ema_of_two_fake_ranks_equals_the_full_ema_bitwise():
    """Rank r holds flat chunk r of every trainable tensor (views that follow the parameters); gathering both ranks'
    EMA shards must give exactly the one-process EMA, skipped steps included, and loading cuts it back."""
    model = _tiny_sit()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    replica = FullReplica(model)
    emas = []

    def gather(name, _local):
        return torch.cat([e.shadow[names.index(name)] for e in emas]).view(params[name].shape)

    for r in range(2):
        views = lambda r=r: [params[n].detach().view(-1).chunk(2)[r] for n in names]
        emas.append(ShardedEMA(names, views, gather, lambda n, full, r=r: full.reshape(-1).chunk(2)[r], replica))
    full = EMA(model)
    for skip in [False, True, False]:
        with torch.no_grad():
            for p in params.values():
                if p.requires_grad:
                    p.add_(torch.randn_like(p))
        flag = torch.tensor(skip)
        full.update(model, 0.9, skip=flag)
        for e in emas:
            e.update(model, 0.9, skip=flag)
    got, want = emas[0].state_dict(), full.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    fresh = ShardedEMA(names, emas[1]._views, gather, emas[1]._slice, replica)
    fresh.load_state_dict(want)
    assert all(torch.equal(a, b) for a, b in zip(fresh.shadow, emas[1].shadow))


def _ddp_backend(rank=1, world=2):
    b = object.__new__(DDPBackend)
    b.rank, b.world_size = rank, world
    return b


@pytest.mark.parametrize(
    "exc,is_peer",
    [
        (RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:903: Connection reset by peer"), True),
        (RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 60000ms for recv operation"), True),
        (dist.DistBackendError("NCCL communicator was aborted"), True),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)"), False),
        (ValueError("Connection reset by peer"), False),  # not raised by a collective
    ],
)
def test_peer_failures_are_told_apart_from_bugs(exc, is_peer):
    got = _ddp_backend().peer_failure(exc, "/runs/x/checkpoints/0000003")
    assert (got is not None) == is_peer
    if is_peer:
        assert isinstance(got, P.PeerFailure) and "rank 1/2" in str(got) and "--resume" in str(got)
        assert "/runs/x/checkpoints/0000003" in str(got) and "REPA_FAST_DIST_TIMEOUT" in str(got)
    assert _ddp_backend(0, 1).peer_failure(exc) is None and P.Backend.peer_failure(None, exc) is None


def test_every_process_group_gets_the_bounded_timeout(monkeypatch):
    monkeypatch.setenv("REPA_FAST_DIST_TIMEOUT", "7")
    assert PG.bound_process_groups() == 0  # no group yet
    store = tempfile.NamedTemporaryFile(delete=False).name
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        extra = dist.new_group([0])  # as DeepSpeed's clone of the world group: torch's 30 min default
        backend = extra._get_backend(torch.device("cpu"))
        assert backend.options._timeout == datetime.timedelta(minutes=30)
        assert PG.bound_process_groups() == 2
        assert backend.options._timeout == datetime.timedelta(seconds=7)
    finally:
        dist.destroy_process_group()


def test_written_config_of_a_deepspeed_run_is_reusable_at_another_world_size(tmp_path, monkeypatch):
    from repa_fast.cli import resolve_config
    from repa_fast.engine.trainer import save_resolved_config

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg, _ = resolve_config(["--config", os.path.join(REPO, "configs", "ds_sit_b.json"), "--data-dir", "x"])
    assert cfg.deepspeed["train_micro_batch_size_per_gpu"] == 128
    save_resolved_config(cfg, str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "4")
    again, _ = resolve_config(["--config", str(tmp_path / "config.json")])
    assert again.deepspeed["train_micro_batch_size_per_gpu"] == 64 and again.flat() == cfg.flat()


def test_the_backend_takes_the_resolved_config_and_refuses_another(monkeypatch):
    """The DeepSpeed section is resolved once (cli.resolve_config); the backend only checks the result."""
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg, _ = resolve_config(["--config", CONFIGS[0]])
    assert check_resolved(cfg.deepspeed, 8) is cfg.deepspeed
    with pytest.raises(ConfigError, match=r"x 4 process\(es\) != train_batch_size 256: it was resolved for another"):
        check_resolved(cfg.deepspeed, 4)
    for raw in (None, {"zero_optimization": {"stage": 2}}):
        with pytest.raises(ConfigError, match="unresolved DeepSpeed config; resolve the training config"):
            check_resolved(raw, 1)


class _RecordingBackend(P.Backend):
    def wrap(self, model, optimizer):
        self.compiled_at_wrap = [b._compiled_call_impl is not None for b in model.blocks]
        return super().wrap(model, optimizer)


@pytest.mark.parametrize("compile_", [True, False])
def test_parallelize_compiles_each_block_before_the_backend_wraps(compile_):
    cfg = TrainConfig()
    cfg.model.compile, cfg.model.compile_backend = compile_, "eager"
    model = _tiny_sit()
    keys = list(model.state_dict())
    backend = _RecordingBackend("cpu")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert P.parallelize(model, opt, cfg, backend) is model and backend.optimizer is opt
    assert backend.compiled_at_wrap == [compile_] * len(model.blocks) and len(model.blocks) > 1
    assert list(model.state_dict()) == keys  # in place: checkpoints look the same with and without --compile
    assert all(b._compiled_call_impl is None for b in EMA(model).module.blocks)  # copies stay eager
    assert all(b._compiled_call_impl is None for b in FullReplica(model).skeleton.blocks)
