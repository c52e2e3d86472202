"""Training: loss goes down, runs are reproducible from a seed, the exported ONNX matches torch."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from engines.models.unet import TINY_CONFIG, build_model  # noqa: E402
from guidance import training  # noqa: E402
from guidance.phantoms import PhantomFrame  # noqa: E402

TINY = training.TrainConfig(
    modalities=("us",),
    steps=3,
    seed=1,
    batch_size=4,
    crop=32,
    image_size=64,
    model=TINY_CONFIG,
    pool_size=3,
    val_every=0,
    threads=1,
)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_model_training_steps_lower_the_loss_on_a_fixed_batch(precision: str) -> None:
    training.seed_everything(0, threads=1)
    cfg = dataclasses.replace(TINY, batch_size=6)
    sampler = training.PhantomSampler(cfg, ("us",), seed=0)
    x, y, tip = sampler.batch()
    model = build_model(TINY_CONFIG)
    loss_fn = training.SegmentationLoss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def loss_now() -> float:
        # Train-mode BatchNorm (batch statistics): running statistics need far more than 15 steps.
        model.train()
        with torch.no_grad():
            logits, tip_logits, _ = model.forward_with_aux(x)
            return float(loss_fn(logits, tip_logits, y, tip)[0])

    before = loss_now()
    model.train()
    for _ in range(15):
        parts = training.training_step(model, loss_fn, opt, (x, y, tip), precision)
    assert set(parts) == {"loss", "ce", "dice", "tversky", "cldice", "tip", "presence", "distill"}
    assert parts["distill"] == 0.0  # no teacher
    # bf16 only under autocast: the weights the optimiser updates stay float32
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert loss_now() < 0.8 * before


def test_model_training_precision_is_checked_before_training(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    training.check_precision("fp32", cpu)
    with pytest.raises(training.TrainingError, match="unknown training precision 'fp16'"):
        training.check_precision("fp16", cpu)
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(training.TrainingError, match=r"no native bfloat16 .* use fp32"):
        training.train(dataclasses.replace(TINY, precision="bf16"), None, progress=False)


def test_model_training_in_bf16_runs_and_exports_a_float32_onnx(tmp_path: Path) -> None:
    cfg = dataclasses.replace(TINY, precision="bf16")
    result = training.train(cfg, tmp_path, progress=False, name="m")
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["training"]["hardware"].endswith("bf16 autocast")
    assert card["training"]["recipe"]["config"]["precision"] == "bf16"
    x = np.random.default_rng(5).random((1, 1, 64, 64), dtype=np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = result.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(["logits"], {"image": x})[0], ref, atol=1e-4, rtol=1e-4)


def test_model_training_is_deterministic_from_seed_and_exports_matching_onnx(tmp_path: Path) -> None:
    a = training.train(TINY, tmp_path / "a", progress=False, name="m")
    b = training.train(TINY, None, progress=False)
    c = training.train(dataclasses.replace(TINY, seed=2), None, progress=False)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert a.steps == b.steps == 3
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    # Trained in channels-last for speed, handed back in the plain NCHW layout export and loaders expect.
    assert all(p.is_contiguous() for p in a.model.parameters())

    # The run folder holds weights, ONNX and a card; ONNX agrees with torch within 1e-4 on the logits.
    card = json.loads((tmp_path / "a" / "m.json").read_text())
    assert card["training"]["steps"] == 3
    assert card["training"]["seed"] == 1
    assert re.fullmatch(r"\d{4}\.\d\d\.\d\d-\d{4}-s1", card["version"])
    assert card["training"]["hardware"] == "CPU, 1 thread"
    assert card["input"]["height"] == 64
    x = np.random.default_rng(5).random((1, 1, 64, 64), dtype=np.float32)
    sess = ort.InferenceSession(str(tmp_path / "a" / "m.onnx"), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"image": x})[0]
    with torch.no_grad():
        ref = a.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=1e-4)
    reloaded = training.load_trained(tmp_path / "a" / "m.pt", TINY_CONFIG)
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(torch.from_numpy(x)).numpy(), ref)


def test_model_training_device_choice_says_why_cuda_is_unusable() -> None:
    assert training.resolve_device("cpu").type == "cpu"
    assert training.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(training.TrainingError, match="unknown training device"):
        training.resolve_device("gpu0")
    with pytest.raises(training.TrainingError, match="CPU or an NVIDIA GPU"):
        training.resolve_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(training.TrainingError, match="sees no CUDA device"):
            training.resolve_device("cuda")
        with pytest.raises(training.TrainingError, match="sees no CUDA device"):
            training.train(dataclasses.replace(TINY, device="cuda"), None, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs on a lent GPU)")
def test_model_training_on_cuda_exports_a_cpu_model_matching_onnx(tmp_path: Path) -> None:
    result = training.train(dataclasses.replace(TINY, device="cuda"), tmp_path, progress=False, name="m")
    assert all(p.device.type == "cpu" for p in result.model.parameters())
    card = json.loads((tmp_path / "m.json").read_text())
    assert "CUDA" in card["training"]["hardware"]
    x = np.random.default_rng(5).random((1, 1, 64, 64), dtype=np.float32)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = result.model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(sess.run(["logits"], {"image": x})[0], ref, atol=1e-4, rtol=1e-4)


def test_model_training_losses_behave() -> None:
    target = torch.zeros(1, 1, 16, 16)
    target[0, 0, 8, 2:14] = 1.0
    assert float(training.soft_cldice(target, target)) < 1e-3
    assert float(training.soft_dice(target, target)) < 1e-3
    assert float(training.tversky(torch.zeros_like(target), target, 0.3, 0.7)) > 0.85
    # Tversky with beta > alpha punishes a miss more than a false alarm of the same size.
    half = target.clone()
    half[0, 0, 8, 8:] = 0.0
    extra = target.clone()
    extra[0, 0, 9, 2:8] = 1.0
    assert float(training.tversky(half, target, 0.3, 0.7)) > float(training.tversky(extra, target, 0.3, 0.7))


def test_model_training_allocator_tuning_takes_on_glibc_only() -> None:
    import platform

    # Speed is a benchmark's business (see the function's docstring); this checks it is applied where it
    # can be and reported honestly where it cannot.
    assert training.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")
    assert training.keep_freed_memory() is training.keep_freed_memory()  # repeatable


def test_model_training_seed_ranges_are_disjoint_from_evaluation() -> None:
    from guidance import evaluation

    cfg = evaluation.EvalConfig()
    held = [s for i in range(len(cfg.modalities)) for s in evaluation.heldout_seeds(cfg, i)]
    lo, hi = training.TRAIN_SEED_RANGE
    assert all(not lo <= s < hi for s in held)
    val = range(training.VALIDATION_SEED_BASE, training.VALIDATION_SEED_BASE + 10_000)
    assert all(s not in val for s in held)


def test_model_augment_keeps_labels_aligned() -> None:
    from guidance.phantoms import make_phantom

    ph = make_phantom("us", seed=3, width=64, height=64, needle=True)
    frame = next(f for f in (ph.frame(i) for i in range(0, 600, 10)) if f.instrument_present)
    rng = np.random.default_rng(0)
    s = training.augment(frame, rng, dataclasses.replace(TINY, crop=64))
    assert s.image.shape == s.labels.shape == s.tip.shape == (64, 64)
    assert s.image.dtype == np.float32
    assert set(np.unique(s.labels)) <= {0, 1, 2}
    assert 0.0 <= float(s.image.min()) <= float(s.image.max()) <= 1.0


def test_model_sampler_forces_rare_lesion_kinds_with_their_own_contrast() -> None:
    from guidance.phantoms.ultrasound import TARGET_CONTRAST

    cfg = dataclasses.replace(TINY, pool_size=12, rare_target_fraction=1.0, hard_negative_fraction=0.0)
    pool = training.PhantomSampler(cfg, ("us",), seed=3).pool
    kinds = [p.config.target_kind for p in pool]
    assert set(kinds) == {"hyper", "iso"}
    for p in pool:
        lo, hi = TARGET_CONTRAST[p.config.target_kind]
        assert lo <= p.config.target_contrast <= hi
    none = dataclasses.replace(cfg, rare_target_fraction=0.0)
    drawn = [p.config.target_kind for p in training.PhantomSampler(none, ("us",), seed=3).pool]
    assert "hypo" in drawn  # the phantom's own mix (60 % hypo) when nothing is forced


def test_model_sampler_fluoro_hard_negatives_are_low_dose_with_opaque_vessels() -> None:
    cfg = dataclasses.replace(TINY, modalities=("fluoro",), pool_size=10, fluoro_hard_negative_fraction=1.0)
    for p in training.PhantomSampler(cfg, ("fluoro",), seed=5).pool:
        assert 150.0 <= p.config.dose_photons <= 400.0
        assert p.config.n_vessels in (2, 3)
        assert 0.35 <= p.config.vessel_mu <= 0.5
    # Off (the default), the sampler's generator stream is the one runs s11-s15 were trained with:
    # the pool is the phantom's own draw, so some sequences have high doses and faint vessels.
    off = dataclasses.replace(cfg, fluoro_hard_negative_fraction=0.0)
    doses = [p.config.dose_photons for p in training.PhantomSampler(off, ("fluoro",), seed=5).pool]
    assert max(doses) > 400.0


def test_model_sampler_point_reflector_hard_negatives() -> None:
    cfg = dataclasses.replace(TINY, pool_size=10, point_reflector_fraction=1.0)
    pool = training.PhantomSampler(cfg, ("us",), seed=5).pool
    assert all(3 <= p.config.n_point_reflectors <= 9 for p in pool)
    assert {p.config.point_layout for p in pool} == {"rows", "scatter"}
    assert any(p.config.gain_db <= -10.0 and p.config.water_bath_db == 0.0 for p in pool)  # tank gain
    tanks = [p.config for p in pool if p.config.water_bath_db > 0.0]
    assert tanks, "some sequences are wire phantoms in a water bath"
    assert all(30.0 <= c.water_bath_db <= 50.0 and c.target_kind == "none" and not c.bone for c in tanks)
    off = dataclasses.replace(cfg, point_reflector_fraction=0.0)
    assert all(p.config.n_point_reflectors == 0 for p in training.PhantomSampler(off, ("us",), seed=5).pool)


def test_model_sampler_curved_wall_hard_negatives() -> None:
    both = dataclasses.replace(TINY, pool_size=12, point_reflector_fraction=0.5, curved_wall_fraction=1.0)
    pool = [p.config for p in training.PhantomSampler(both, ("us",), seed=6).pool]
    tissue = [c for c in pool if c.water_bath_db == 0.0]
    assert tissue
    assert all(1 <= c.n_curved_walls <= 3 for c in tissue)
    baths = [c for c in pool if c.water_bath_db > 0.0]
    assert baths
    assert all(c.n_curved_walls == 0 for c in baths)  # no tissue, no walls
    assert all(c.n_line_reflectors == 0 for c in pool)  # only with bath_lines
    lined = dataclasses.replace(both, point_reflector_fraction=1.0, bath_lines=True, pool_size=24)
    tanks = [p.config for p in training.PhantomSampler(lined, ("us",), seed=6).pool if p.config.water_bath_db]
    assert {c.n_line_reflectors for c in tanks} == {0, 1, 2}
    off = dataclasses.replace(both, curved_wall_fraction=0.0)
    assert all(p.config.n_curved_walls == 0 for p in training.PhantomSampler(off, ("us",), seed=6).pool)


def test_model_train_command_options_reach_the_config() -> None:
    from guidance.cli import build_parser
    from guidance.commands.train import train_config

    base = training.TrainConfig()
    args = build_parser().parse_args(["train", "--modality", "us", "--steps", "5", "--seed", "9"])
    plain = train_config(args, base)
    # options left unset keep the defaults
    assert plain == dataclasses.replace(base, modalities=("us",), steps=5, seed=9)

    options = "--lr 3e-4 --init w.pt --target-weight 2.5 --hard-negative 0.6 --fluoro-hard-negative 0.3"
    options += " --point-reflectors 0.25 --curved-walls 0.2 --bath-lines"
    cfg = train_config(build_parser().parse_args(["train", *options.split()]), base)
    assert cfg.modalities == ("us", "fluoro")
    assert (cfg.lr, cfg.init_weights) == (3e-4, "w.pt")
    assert cfg.target_ce_weight == cfg.target_dice_weight == 2.5
    assert (cfg.hard_negative_fraction, cfg.fluoro_hard_negative_fraction) == (0.6, 0.3)
    assert (cfg.point_reflector_fraction, cfg.curved_wall_fraction, cfg.bath_lines) == (0.25, 0.2, True)
    assert not cfg.model.presence_head
    assert not cfg.freeze_body
    assert cfg.precision == "fp32"
    assert train_config(build_parser().parse_args(["train", "--precision", "bf16"]), base).precision == "bf16"
    assert (cfg.teacher_weights, cfg.w_distill) == (None, 1.0)
    args = build_parser().parse_args(["train", "--teacher", "t.pt", "--distill-weight", "2"])
    assert (train_config(args, base).teacher_weights, train_config(args, base).w_distill) == ("t.pt", 2.0)

    args = build_parser().parse_args(["train", "--init", "w.pt", "--presence-head", "--freeze-body"])
    cfg = train_config(args, base)
    assert cfg.model == dataclasses.replace(base.model, presence_head=True)
    assert cfg.freeze_body


def test_model_distillation_loss_is_the_kl_from_the_teacher() -> None:
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 8, 8, generator=gen)
    student = torch.randn(2, 3, 8, 8, generator=gen)
    assert float(training.distillation_loss(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-6)
    p_t, log_s = torch.softmax(teacher, 1), torch.log_softmax(student, 1)
    by_hand = (p_t * (torch.log(p_t) - log_s)).sum(1).mean()
    assert float(training.distillation_loss(student, teacher)) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(by_hand) > 0.01
    # the teacher side carries no gradient
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    training.distillation_loss(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_model_distillation_pulls_the_student_to_the_mirrored_teacher(tmp_path: Path) -> None:
    """With only the distillation term, a fresh student moves towards the frozen, mirrored teacher."""
    training.seed_everything(0, threads=1)
    teacher_net = build_model(TINY_CONFIG)
    torch.save(teacher_net.state_dict(), tmp_path / "teacher.pt")
    zero = {"w_ce": 0.0, "w_dice": 0.0, "w_tversky": 0.0, "w_cldice": 0.0, "w_tip": 0.0, "w_presence": 0.0}
    cfg = dataclasses.replace(TINY, batch_size=6, teacher_weights=str(tmp_path / "teacher.pt"), **zero)
    teacher = training.load_teacher(cfg, torch.device("cpu"))
    assert teacher is not None
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    x, y, tip = training.PhantomSampler(cfg, ("us",), seed=0).batch()
    with torch.no_grad():
        target = teacher(x)
    # the teacher is the mirror average, not the plain network
    assert not torch.allclose(target, teacher_net.eval()(x), atol=1e-4)
    student = build_model(TINY_CONFIG)
    loss_fn = training.SegmentationLoss(cfg)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)

    def gap() -> float:
        student.train()
        with torch.no_grad():
            return float(training.distillation_loss(student(x), target))

    before = gap()
    for _ in range(20):
        parts = training.training_step(student, loss_fn, opt, (x, y, tip), "fp32", teacher=teacher)
    assert parts["distill"] > 0.0
    assert parts["loss"] == pytest.approx(parts["distill"], rel=1e-5)
    assert gap() < 0.5 * before
    for k, v in teacher_net.state_dict().items():  # frozen: not a bit moved
        assert torch.equal(teacher.model.state_dict()[k].contiguous(), v.contiguous()), k

    # A whole run records the teacher, by name and sha256, in the card's recipe
    result = training.train(cfg, tmp_path / "run", progress=False, name="m")
    card = json.loads((tmp_path / "run" / "m.json").read_text(encoding="utf-8"))
    loss = card["training"]["recipe"]["loss"]
    digest = hashlib.sha256((tmp_path / "teacher.pt").read_bytes()).hexdigest()
    assert "KL(teacher || student)" in loss
    assert digest in loss
    assert result.steps == cfg.steps

    # A teacher that lacks part of the student's network is refused, saying what it lacks
    headed = dataclasses.replace(cfg, model=dataclasses.replace(TINY_CONFIG, presence_head=True))
    with pytest.raises(training.TrainingError, match="lacks presence"):
        training.load_teacher(headed, torch.device("cpu"))


def test_model_presence_head_trains_alone_on_a_frozen_network(tmp_path: Path) -> None:
    """--presence-head --freeze-body: the loaded network stays bit for bit; only the new head learns."""
    body = build_model(TINY_CONFIG)
    torch.save(body.state_dict(), tmp_path / "body.pt")
    cfg = dataclasses.replace(
        TINY,
        steps=4,
        lr=1e-2,
        model=dataclasses.replace(TINY_CONFIG, presence_head=True),
        init_weights=str(tmp_path / "body.pt"),
        freeze_body=True,
        val_every=2,
        val_sequences=1,
        val_frames_per_sequence=2,
    )
    result = training.train(cfg, None, progress=False)
    trained = result.model.state_dict()
    for k, v in body.state_dict().items():  # weights and BatchNorm statistics alike
        assert torch.equal(trained[k], v), k
    assert result.model.presence is not None
    head = build_model(cfg.model)
    training.load_initial_weights(head, str(tmp_path / "body.pt"))  # the same start, untrained head
    assert any(
        not torch.equal(trained[k], v) for k, v in head.state_dict().items() if k.startswith("presence.")
    )
    assert "val_presence_accuracy" in result.history[-1]
    assert result.history[-1]["presence"] > 0.0

    # Nothing new to train, or weights of another network: said plainly.
    with pytest.raises(training.TrainingError, match="lack nothing"):
        training.train(dataclasses.replace(cfg, model=TINY_CONFIG), None, progress=False)
    other = build_model(dataclasses.replace(TINY_CONFIG, widths=(4, 8, 16)))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(training.TrainingError, match="does not fit"):
        training.load_initial_weights(build_model(cfg.model), str(tmp_path / "other.pt"))


# ------------------------------------------------------------------------------------- temporal models
TEMPORAL_TINY = dataclasses.replace(TINY_CONFIG, in_channels=2)


def _needle_frames() -> tuple[PhantomFrame, PhantomFrame]:
    from guidance.phantoms import make_phantom

    ph = make_phantom("us", seed=3, width=64, height=64, needle=True)
    k = next(i for i in range(10, 600, 10) if ph.frame(i).instrument_present)
    return ph.frame(k), ph.frame(k - 1)


def test_model_temporal_sample_is_the_frame_and_its_difference() -> None:
    from engines.models.preprocess import normalize

    frame, prev = _needle_frames()
    single = training.frame_to_sample(frame, 64, 2.0)
    first = training.frame_to_sample(frame, 64, 2.0, temporal=True)
    pair = training.frame_to_sample(frame, 64, 2.0, temporal=True, previous=prev)
    assert single.image.shape == (64, 64)
    assert first.image.shape == pair.image.shape == (2, 64, 64)
    np.testing.assert_array_equal(first.image[0], single.image)
    assert not first.image[1].any()  # a stream's first frame: no difference
    np.testing.assert_array_equal(pair.image[0], single.image)
    np.testing.assert_allclose(pair.image[1], single.image - normalize(prev.image), atol=1e-6)
    assert np.abs(pair.image[1]).max() > 0.05  # the needle moved


def test_model_temporal_augment_gives_both_frames_one_transform() -> None:
    """The same frame as its own previous frame: the difference is only the per-frame noise, and exactly 0
    on the draws that add none (so geometry, crop and intensity are the same for both)."""
    frame, _ = _needle_frames()
    cfg = dataclasses.replace(TINY, model=TEMPORAL_TINY)
    exact = 0
    for seed in range(24):
        s = training.augment(frame, np.random.default_rng(seed), cfg, previous=frame, temporal=True)
        assert s.image.shape == (2, 32, 32)
        assert s.labels.shape == s.tip.shape == (32, 32)
        assert abs(float(s.image[1].mean())) < 0.02
        exact += int(not s.image[1].any())
    assert 0 < exact < 24
    # No previous frame (a stream's first): a zero difference channel.
    s = training.augment(frame, np.random.default_rng(0), cfg, temporal=True)
    assert not s.image[1].any()


def test_model_temporal_sampler_pairs_frames_of_one_sequence() -> None:
    cfg = dataclasses.replace(TINY, model=TEMPORAL_TINY, first_frame_fraction=0.0, max_frame_gap=3)
    sampler = training.PhantomSampler(cfg, ("us",), seed=0)
    for _ in range(8):
        frame, prev = sampler._frame()
        if frame.index == 0:
            assert prev is None
            continue
        assert prev is not None
        assert 1 <= frame.index - prev.index <= 3
    x, y, tip = sampler.batch()
    assert tuple(x.shape) == (4, 2, 32, 32)
    assert tuple(y.shape) == (4, 32, 32)
    assert tuple(tip.shape) == (4, 1, 32, 32)
    single = training.PhantomSampler(TINY, ("us",), seed=0).batch()[0]
    assert tuple(single.shape) == (4, 1, 32, 32)


def test_model_single_frame_weights_start_a_temporal_model_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    single = build_model(TINY_CONFIG).eval()
    torch.save(single.state_dict(), tmp_path / "single.pt")
    temporal = build_model(TEMPORAL_TINY)
    assert training.load_initial_weights(temporal, str(tmp_path / "single.pt")) == []
    temporal.eval()
    assert not temporal.state_dict()["stem.0.0.weight"][:, 1].any()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        expected = single(x)
        got = temporal(torch.cat([x, torch.rand(2, 1, 64, 64) - 0.5], dim=1))
    torch.testing.assert_close(got, expected)


def test_model_temporal_training_runs_and_exports_a_temporal_card(tmp_path: Path) -> None:
    cfg = dataclasses.replace(
        TINY, model=TEMPORAL_TINY, val_every=2, val_sequences=1, val_frames_per_sequence=2
    )
    result = training.train(cfg, tmp_path, progress=False)
    assert "val_instrument_dice" in result.history[-1]
    card = json.loads((tmp_path / "guidance-unet.json").read_text())
    assert card["input"]["channels"] == 2
    assert card["input"]["channel_meaning"] == ["current frame", "current frame minus previous frame"]
    assert card["input"]["shape"] == [1, 2, 64, 64]


def test_model_train_command_temporal_option() -> None:
    from guidance.cli import build_parser
    from guidance.commands.train import train_config

    base = training.TrainConfig()
    cfg = train_config(build_parser().parse_args(["train", "--temporal", "--presence-head"]), base)
    assert cfg.model == dataclasses.replace(base.model, in_channels=2, presence_head=True)
    assert cfg.temporal
    assert not base.temporal


def test_model_training_runs_with_its_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    """``guidance train`` shows a progress bar by default: its library (the ``train`` extra) is installed
    wherever torch is, and the bar reaches the end of the steps."""
    training.train(dataclasses.replace(TINY, steps=2), None, progress=True)
    err = capsys.readouterr().err
    assert "train" in err
    assert "2/2" in err
