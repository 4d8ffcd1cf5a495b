import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import mrcnn_tf
from mrcnn_tf.data import build_dataset
from mrcnn_tf.model import LOSS_KEYS
from mrcnn_tf.optim import WarmupStepDecay
from mrcnn_tf.training import StopOnNaN
from tests.conftest import REPO

SHAPES = str(REPO / "configs" / "shapes.yaml")
SMALL = ["train.batch_size=2", "data.train.num_images=16", "data.eval.num_images=4",
         "eval.batch_size=2"]


def _model(extra=(), seed=0):
    keras.utils.set_random_seed(seed)
    cfg = mrcnn_tf.load_config(SHAPES, SMALL + list(extra))
    model = mrcnn_tf.build_model(cfg)
    model.compile()
    return cfg, model


def _fixed_batch(cfg):
    return next(iter(build_dataset(cfg, training=False)))


def test_fit_logs_every_loss_and_the_learning_rate():
    cfg, model = _model()
    hist = model.fit(build_dataset(cfg, True), steps_per_epoch=2, epochs=1, verbose=0)
    assert set(LOSS_KEYS) | {"loss", "learning_rate"} <= set(hist.history)
    assert all(np.isfinite(v[-1]) for v in hist.history.values())


@pytest.mark.slow
def test_every_head_changes_after_20_steps():
    cfg, model = _model()
    parts = ("backbone", "fpn", "rpn_head", "box_head", "mask_head")
    before = {p: [w.numpy() for w in getattr(model, p).trainable_weights] for p in parts}
    model.fit(build_dataset(cfg, True), steps_per_epoch=20, epochs=1, verbose=0)
    for p in parts:
        after = [w.numpy() for w in getattr(model, p).trainable_weights]
        kernels = [i for i, w in enumerate(getattr(model, p).trainable_weights)
                   if w.path.endswith("kernel")]
        assert kernels
        for i in kernels:
            assert not np.array_equal(before[p][i], after[i]), (p, i)


@pytest.mark.slow
def test_loss_falls_when_overfitting_one_batch():
    # At 0.01 the loss falls to about 0.37x in 40 steps; at 0.02 it oscillates (0.32x, then
    # 0.5x), so the end point depends on float summation order.
    cfg, model = _model(["train.base_learning_rate=0.01", "train.warmup_steps=0"])
    data = tf.data.Dataset.from_tensors(_fixed_batch(cfg)).repeat()
    hist = model.fit(data, steps_per_epoch=1, epochs=40, verbose=0)
    loss = hist.history["loss"]
    print(f"overfit one batch: loss {loss[0]:.3f} -> {loss[-1]:.3f}")
    assert np.mean(loss[-5:]) < 0.5 * loss[0]


def test_fixed_seed_loss_tripwire():
    # The total loss of a fixed batch for a fixed-seed model. A change here means the model,
    # targets or losses changed: check it was meant, then update the number.
    cfg, model = _model(seed=123)
    batch = _fixed_batch(cfg)
    tf.random.set_seed(7)
    losses = model.forward_train(*batch, training=False)
    total = float(tf.add_n(list(losses.values())))
    print("tripwire:", {k: round(float(v), 5) for k, v in losses.items()})
    assert total == pytest.approx(2.7128, abs=0.005)
    # Fully sampled terms do not depend on the sampler's randomness.
    assert float(losses["loss_mask"]) == pytest.approx(0.6920, abs=0.001)


def test_image_without_objects():
    cfg, model = _model()
    images, targets = _fixed_batch(cfg)
    empty = dict(targets, gt_classes=-tf.ones_like(targets["gt_classes"]),
                 gt_boxes=tf.zeros_like(targets["gt_boxes"]))
    losses = model.forward_train(images, empty, training=True)
    assert float(losses["loss_box_reg"]) == 0.0
    assert float(losses["loss_mask"]) == 0.0
    assert float(losses["loss_rpn_box"]) == 0.0
    assert all(np.isfinite(float(v)) for v in losses.values())
    hist = model.fit(tf.data.Dataset.from_tensors((images, empty)), epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][-1])


def test_users_own_pipeline_of_the_same_contract():
    cfg, model = _model()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 128, 128, 3)).astype(np.float32)
    masks = np.zeros((2, 8, 128, 128), np.uint8)
    masks[:, 0, 20:60, 30:90] = 1
    boxes = np.zeros((2, 8, 4), np.float32)
    boxes[:, 0] = [20, 30, 60, 90]
    classes = -np.ones((2, 8), np.int32)
    classes[:, 0] = 2
    targets = {"gt_boxes": boxes, "gt_classes": classes, "gt_masks": masks,
               "image_info": {"image_size": np.full((2, 2), 128, np.int32)}}
    ds = tf.data.Dataset.from_tensors((images, targets)).repeat(3)
    hist = model.fit(ds, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][-1])
    out = model.predict(ds.take(1), verbose=0)
    assert out["detection_boxes"].shape == (2, 20, 4)


def test_jit_compile_is_refused_and_auto_is_off():
    cfg, model = _model()
    with pytest.raises(ValueError, match="no XLA kernel"):
        model.compile(jit_compile=True)
    model.compile(jit_compile="auto")
    assert model.jit_compile is False


def test_schedule_warmup_and_steps():
    s = WarmupStepDecay(0.02, 1000, 0.001, (60000, 80000), 0.1)
    got = [float(s(k)) for k in (0, 500, 59999, 60000, 80000)]
    np.testing.assert_allclose(got, [2e-5, 0.010010, 0.02, 0.002, 2e-4], rtol=1e-4)


@pytest.mark.parametrize("params", [pytest.param("all", marks=pytest.mark.slow), "no_norm",
                                    pytest.param("kernels", marks=pytest.mark.slow)])
def test_weight_decay_params_and_lr_scaling(params):
    # First SGD step (momentum buffers empty): update = lr * (grad + wd * w) for the decayed
    # variables and lr * grad elsewhere. Two models with the same weights and the same random
    # sampling differ by exactly lr * wd * w on the variables train.weight_decay_params selects
    # (the shapes model has conv/dense kernels and biases and BN gammas/betas) and not at all
    # elsewhere.
    common = ["train.base_learning_rate=0.01", "train.warmup_steps=0",
              "train.reference_batch_size=4", f"train.weight_decay_params={params}"]
    cfg, decayed = _model(common + ["train.weight_decay=0.5"])
    _, plain = _model(common + ["train.weight_decay=0.0"])
    plain.set_weights(decayed.get_weights())
    lr = float(decayed.optimizer.learning_rate)
    assert lr == pytest.approx(0.005)  # 0.01 * batch 2 / reference 4
    before = {w.path: w.numpy() for w in decayed.trainable_weights}
    batch = _fixed_batch(cfg)
    for model in (decayed, plain):
        tf.random.set_seed(11)
        model.train_step(batch)
    after_plain = {w.path: w.numpy() for w in plain.trainable_weights}
    kinds = {"kernel": 0, "bias": 0, "gamma": 0, "beta": 0}
    selected = {"all": set(kinds), "no_norm": {"kernel", "bias"}, "kernels": {"kernel"}}[params]
    for w in decayed.trainable_weights:
        kind = w.path.rsplit("/", 1)[-1]
        kinds[kind] += 1
        diff = w.numpy() - after_plain[w.path]
        expected = -lr * 0.5 * before[w.path] if kind in selected else 0.0
        np.testing.assert_allclose(diff, expected, atol=1e-6, err_msg=w.path)
    assert min(kinds.values()) > 5, kinds


def test_mixed_bfloat16_step():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        cfg, model = _model(["train.mixed_precision=mixed_bfloat16"])
        assert model.backbone.stem_conv.compute_dtype == "bfloat16"
        losses = model.forward_train(*_fixed_batch(cfg))
        assert all(v.dtype == tf.float32 and np.isfinite(float(v)) for v in losses.values())
        hist = model.fit(build_dataset(cfg, True), steps_per_epoch=1, epochs=1, verbose=0)
        assert np.isfinite(hist.history["loss"][-1])
    finally:
        keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("flags, native", [
    ("fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
    ("fpu avx2 avx512f amx_bf16 amx_tile avx512_bf16", "amx_bf16"),
    ("fpu sse2 avx2 fma", None),  # an AVX2-only EPYC of earlier stops
])
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(tmp_path, monkeypatch,
                                                                    flags, native):
    from mrcnn_tf import training

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: X\nflags\t\t: {flags}\n\n"
                    f"processor\t: 1\nflags\t\t: {flags}\n")
    assert training.native_bfloat16_cpu(str(info)) == native
    assert training.native_bfloat16_cpu(str(tmp_path / "absent")) is None
    monkeypatch.setattr(training, "native_bfloat16_cpu", lambda: native)
    assert training.dtype_policy("auto") == ("mixed_bfloat16" if native else "float32")
    for name in ("float32", "mixed_float16", "mixed_bfloat16"):
        assert training.dtype_policy(name) == name


def test_a_mixed_run_leaves_the_global_policy_and_exports_float32(tmp_path, monkeypatch):
    """train() sets the run's policy only while it trains; train.py's export of a model trained
    in bfloat16 is a float32 model with the same weights (TF Serving's CPU may have no bf16)."""
    from mrcnn_tf import serving, training
    from mrcnn_tf.cli.train import export_run

    cfg = mrcnn_tf.load_config(SHAPES, SMALL + ["train.steps=2", "train.checkpoint_every=2",
                                                "train.mixed_precision=auto"])
    monkeypatch.setattr(training, "native_bfloat16_cpu", lambda: "avx512_bf16")
    model, summary = training.train(cfg, tf.distribute.get_strategy(), str(tmp_path / "run"),
                                    verbose=0)
    assert summary["final_step"] == 2 and model.compute_dtype == "bfloat16"
    assert keras.mixed_precision.global_policy().name == "float32"
    exported = {}
    monkeypatch.setattr(serving, "export_saved_model",
                        lambda m, ids, names, path, **kw: exported.update(model=m, path=path))
    export_run(model, cfg, str(tmp_path / "run"))
    assert exported["model"].compute_dtype == "float32"
    assert exported["path"] == str(tmp_path / "run" / "export" / "1")
    for a, b in zip(model.weights, exported["model"].weights, strict=True):
        assert a.path == b.path and np.array_equal(a.numpy(), b.numpy())


def test_stop_on_nan_has_a_clear_message(capsys):
    cfg, model = _model()
    kernel = model.box_head.class_logits.kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))  # NaN class logits
    data = tf.data.Dataset.from_tensors(_fixed_batch(cfg)).repeat()
    cb = StopOnNaN()
    model.fit(data, steps_per_epoch=5, epochs=2, callbacks=[cb], verbose=0)
    assert cb.bad is not None and "at step 1" in cb.bad
    assert "stopping: loss" in capsys.readouterr().out
    assert int(model.optimizer.iterations.numpy()) == 1


def _run_train(model_dir, steps, extra=(), timeout=300, options=()):
    """train.py on ``model_dir`` with more --set overrides ``extra`` and command ``options``."""
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--model_dir", model_dir,
                           "--verbose", "2", *options, "--set", f"train.steps={steps}",
                           "train.checkpoint_every=5", *SMALL, *extra],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


@pytest.mark.slow
def test_kill_during_training_then_resume(tmp_path):
    """A run of a non-default model is killed; meanwhile a second run on its directory is
    refused, naming the first; the resume, without the run's --set, rebuilds the run's own
    model from config.json, takes over the dead run's lock, removes the temporary folder of a
    checkpoint write killed part-way, and runs exactly the remaining steps."""
    model_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--model_dir", model_dir,
                             "--verbose", "0", "--set", "train.steps=400",
                             "train.checkpoint_every=5", "model.fpn.channels=32",
                             "model.rpn.conv_channels=32", *SMALL],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                            start_new_session=True)
    ckpt = os.path.join(model_dir, "checkpoints", "checkpoint")
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            latest = tf.train.latest_checkpoint(os.path.dirname(ckpt)) if os.path.exists(
                ckpt) else None
            if latest and int(latest.rsplit("-", 1)[1]) >= 10:
                break
            time.sleep(0.5)
        else:
            pytest.fail("no checkpoint at step >= 10 within 240 s")
        second = _run_train(model_dir, 500)
        assert second.returncode == 4
        assert f"in use by the run of process {proc.pid}" in second.stderr
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_at = int(tf.train.latest_checkpoint(os.path.dirname(ckpt)).rsplit("-", 1)[1])
    partial = os.path.join(model_dir, "checkpoints", f"ckpt-{killed_at + 5}_temp")
    os.makedirs(os.path.join(partial, "part-00000-of-00001"))
    res = _run_train(model_dir, killed_at + 5)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {model_dir}/checkpoints/ckpt-{killed_at} at step {killed_at}" in \
        res.stdout
    assert "config: train.steps differs from the run's config.json" in res.stdout
    assert "taking over" in res.stderr and not os.path.exists(partial)
    with open(os.path.join(model_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["resumed_from_step"] == killed_at
    assert summary["final_step"] == killed_at + 5 and summary["steps_run"] == 5
    assert not os.path.exists(os.path.join(model_dir, ".lock"))


def _checkpoint_finite(path) -> bool:
    reader = tf.train.load_checkpoint(path)
    return all(np.isfinite(reader.get_tensor(name)).all()
               for name, dtype in reader.get_variable_to_dtype_map().items()
               if dtype.is_floating)


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} is not strict JSON: {constant}")

    with open(path) as f:
        return json.loads(f.read(), parse_constant=refuse)


@pytest.mark.slow
def test_nan_is_never_checkpointed_and_resume_starts_from_the_last_finite(tmp_path):
    """The issue's repro: lr 1e5 from step 0, a checkpoint every step. The run stops with exit
    code 3, no checkpoint holds a non-finite value, summary.json is strict JSON, and resuming
    (as the message advises, with a lower learning rate) starts from the last finite checkpoint
    and again writes no non-finite one."""
    model_dir = str(tmp_path / "run")
    res = _run_train(model_dir, 20, ["train.base_learning_rate=100000.0",
                                     "train.warmup_steps=0", "train.checkpoint_every=1",
                                     "data.train.num_images=64"])
    assert res.returncode == 3, res.stderr[-3000:]
    assert "stopping: loss" in res.stdout
    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    assert state is not None and state.all_model_checkpoint_paths
    assert all(_checkpoint_finite(p) for p in state.all_model_checkpoint_paths)
    summary = _strict_json(os.path.join(model_dir, "summary.json"))
    assert summary["stopped_on_nan"] and None in summary["final_logs"].values()
    last = int(state.model_checkpoint_path.rsplit("-", 1)[1])
    assert last < summary["final_step"]
    res = _run_train(model_dir, last + 2, ["train.base_learning_rate=0.001",
                                           "train.checkpoint_every=1"])
    assert res.returncode in (0, 3), res.stderr[-3000:]
    assert f"resumed from {model_dir}/checkpoints/ckpt-{last} at step {last}" in res.stdout
    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    assert all(_checkpoint_finite(p) for p in state.all_model_checkpoint_paths)


def test_resume_skips_non_finite_checkpoints_of_older_runs(tmp_path, capsys):
    """Checkpoints an older version wrote after a NaN step: the resume walks back to the newest
    finite one."""
    from mrcnn_tf.checkpoint import make_checkpoint
    from mrcnn_tf.training import restore_finite

    _, model = _model()
    manager = tf.train.CheckpointManager(make_checkpoint(model, model.optimizer),
                                         str(tmp_path / "checkpoints"), 3)
    model.optimizer.iterations.assign(4)
    manager.save(4)
    good = [w.numpy().copy() for w in model.weights]
    kernel = model.box_head.class_logits.kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    model.optimizer.iterations.assign(5)
    manager.save(5)
    _, other = _model()
    assert restore_finite(other, str(tmp_path)) == 4
    assert "ckpt-5: its weights are not finite" in capsys.readouterr().out
    for a, b in zip(good, other.weights):
        np.testing.assert_array_equal(a, b.numpy())
    kernel = other.box_head.class_logits.kernel
    kernel.assign(np.full(kernel.shape, np.nan, np.float32))
    other.optimizer.iterations.assign(4)
    tf.train.CheckpointManager(make_checkpoint(other, other.optimizer),
                               str(tmp_path / "checkpoints"), 3).save(4)  # ckpt-4 now NaN too
    with pytest.raises(ValueError, match="no checkpoint in .* has finite weights"):
        restore_finite(other, str(tmp_path))


def test_training_on_no_usable_image_is_an_error_naming_the_file(tmp_path):
    """Every image of the annotation file passes the header check but fails to decode: an
    error naming the file and counting the reasons, exit code 2, no checkpoint."""
    from tests.data.fixtures import ann, make_coco, write_image

    images = []
    for i in range(3):
        path = tmp_path / f"{i}.jpg"
        write_image(path, 40, 50, seed=i)
        data = bytearray(path.read_bytes())
        data[2:-2] = b"\x00" * (len(data) - 4)  # framed like a JPEG, garbage inside
        path.write_bytes(bytes(data))
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "height": 40, "width": 50})
    ann_file, image_dir = make_coco(tmp_path, images, [ann(i + 1, i + 1, 2, 2, 10)
                                                       for i in range(3)])
    model_dir = tmp_path / "run"
    res = _run_train(str(model_dir), 5, [
        "data.train.source=coco", f"data.train.annotation_file={ann_file}",
        f"data.train.image_dir={image_dir}", "model.num_classes=2"])
    assert res.returncode == 2, res.stderr[-3000:]
    assert f"data.train: {ann_file} yields no usable image (3 x " in res.stderr
    assert not (model_dir / "checkpoints" / "checkpoint").exists()


@pytest.mark.slow
def test_full_disk_names_the_directory_and_keeps_earlier_checkpoints(tmp_path):
    """model_dir on a 24 MB tmpfs: the first checkpoint fits, the second does not. The run
    stops with a message naming the directory, and the first checkpoint is intact."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode()[:200]}")
    try:
        model_dir = str(disk / "run")
        res = _run_train(model_dir, 6, ["train.checkpoint_every=1"], options=["--mode", "train"])
        assert res.returncode == 2, res.stderr[-3000:]
        assert f"could not write the checkpoint of step 2 to {model_dir}/checkpoints" in \
            res.stderr
        first = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
        assert first.endswith("ckpt-1") and _checkpoint_finite(first)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_train_py_rejects_bad_config_keys(tmp_path):
    res = _run_train(str(tmp_path / "r"), 1, ["train.stepz=3"])
    assert res.returncode == 2
    assert "unknown key 'train.stepz'" in res.stderr


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device():
    # Same global batch, every anchor and RoI sampled: the only differences are float32
    # summation orders (per-replica partial sums, then an all-reduce), about 1e-7 relative per
    # sum over ~1e5 terms; 1e-4 absolute on weights of scale ~0.2 leaves a wide margin, while a
    # wrong normalisation or a missing all-reduce moves weights by ~1e-3 after 3 steps.
    res = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" /
                                              "mirrored_equivalence.py"), "3", SHAPES],
                         capture_output=True, text=True, timeout=600, cwd=REPO,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print("mirrored vs single device:", out)
    assert out["max_abs_weight_diff"] <= 1e-4
    assert out["loss_single"] == pytest.approx(out["loss_mirrored"], rel=1e-5)


@pytest.mark.slow
def test_multi_worker_two_processes_identical_weights(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" / "multi_worker.py"),
                          str(tmp_path), "4"], capture_output=True, text=True, timeout=660,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    logs = "".join(open(tmp_path / f"worker{i}.log").read()[-2000:] for i in range(2))
    assert out["exit_codes"] == [0, 0], logs
    assert out["final_step"] == 4
    assert out["max_abs_diff"] == 0.0


@pytest.mark.slow
def test_memorises_coco_tiny16(shared_data, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "tests" / "scripts" /
                                              "memorize_coco_tiny.py"), str(shared_data),
                          str(tmp_path / "run"), "400"], capture_output=True, text=True,
                         timeout=1800, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print("coco_tiny16 memorisation:", out)
    # Untrained, AP50 is ~0. Runs of the same code differ (CPU training is not bitwise
    # repeatable): earlier runs of this test reached AP50 0.42 to 0.66, so 0.5 sat inside that
    # spread and the bound is 0.3.
    assert out["bbox"]["AP50"] >= 0.3


def _event_tags(folder: str) -> set[str]:
    """The summary tags written to the TensorBoard event files in ``folder``."""
    import tensorflow as tf

    tags = set()
    for name in os.listdir(folder):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(folder, name)):
            tags |= {v.tag for v in event.summary.value}
    return tags


@pytest.mark.slow
def test_train_and_eval_under_mirrored_then_eval_mode(tmp_path):
    # The main job's flow at toy size, under MirroredStrategy over 2 logical CPUs: evaluation
    # during fit (metrics.json, TensorBoard), prediction PNGs, the exported SavedModel; then
    # `--mode eval` on the latest checkpoint appends one more entry.
    model_dir = str(tmp_path / "run")
    common = ["--model_dir", model_dir, "--verbose", "0", "--set", "train.steps=4",
              "train.checkpoint_every=2", "train.batch_size=2", "eval.every_n_steps=2",
              "data.eval.num_images=4", "eval.batch_size=2", "data.train.num_images=8",
              "model.backbone.norm=sync_bn", "eval.tensorboard_images=3"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--strategy", "mirrored",
                          "--cpu_replicas", "2", *common], capture_output=True, text=True,
                         timeout=600, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(os.path.join(model_dir, "metrics.json")) as f:
        entries = json.load(f)
    assert [e["step"] for e in entries] == [2, 4]
    assert set(entries[0]["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert set(entries[0]["segm"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    tags = _event_tags(os.path.join(model_dir, "tensorboard", "eval"))
    assert {"bbox/AP", "segm/AP50", "per_class_AP", "precision_recall"} <= tags
    assert len([t for t in tags if t.startswith("predictions/")]) == 3  # eval.tensorboard_images
    assert len(os.listdir(os.path.join(model_dir, "predictions"))) == 4
    assert os.path.exists(os.path.join(model_dir, "export", "1", "saved_model.pb"))
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--mode", "eval", *common],
                         capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evaluation:" in res.stdout and '"step": 4' in res.stdout
    with open(os.path.join(model_dir, "metrics.json")) as f:
        assert [e["step"] for e in json.load(f)] == [2, 4, 4]


def test_frozen_backbone_without_initial_weights_is_refused_before_building(tmp_path):
    from mrcnn_tf.config import ConfigError
    from mrcnn_tf.training import train

    cfg = mrcnn_tf.load_config(REPO / "configs" / "torchvision_r50_fpn.yaml",
                               ["model.backbone.name=resnet_small"])
    model_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"norm=frozen_bn and model\.backbone\.freeze_at=2.*"
                                          r"model\.backbone\.weights=PATH"):
        train(cfg, tf.distribute.get_strategy(), str(model_dir))
    assert not model_dir.exists() or not any(model_dir.iterdir())  # nothing built or written
    res = _run_train(str(model_dir), 1, ["model.backbone.norm=frozen_bn"])
    assert res.returncode == 2 and "model.backbone.norm=frozen_bn keep part" in res.stderr


def _save_run(model, run_dir):
    """A run directory as train.py leaves it: checkpoints/ckpt-N."""
    from mrcnn_tf.checkpoint import make_checkpoint

    return tf.train.CheckpointManager(make_checkpoint(model, model.optimizer),
                                      str(run_dir / "checkpoints"), 1).save(7)


@pytest.mark.parametrize("source", ["run_dir", "checkpoint", "weights_h5"])
def test_init_from_takes_every_weight_and_reinitialises_other_class_layers(tmp_path, source):
    from mrcnn_tf.model import CLASS_DEPENDENT, weight_key
    from mrcnn_tf.weights import load_initial_weights

    _, old = _model(seed=1)
    path = {"run_dir": str(tmp_path), "checkpoint": _save_run(old, tmp_path),
            "weights_h5": str(tmp_path / "old.weights.h5")}[source]
    if source == "weights_h5":
        old.save_weights(path)
    _, new = _model(["model.num_classes=5"], seed=2)
    fresh = {w.path: w.numpy().copy() for w in new.weights}
    skipped = load_initial_weights(new, path)
    old_weights = {weight_key(w.path): w.numpy() for w in old.weights}
    class_paths = []
    for w in new.weights:
        rel = weight_key(w.path)
        if rel.startswith(CLASS_DEPENDENT):
            class_paths.append(w.path)
            np.testing.assert_array_equal(w.numpy(), fresh[w.path])
        else:
            np.testing.assert_array_equal(w.numpy(), old_weights[rel], err_msg=rel)
    assert sorted(skipped) == sorted(class_paths) and len(skipped) == 6


def test_init_from_refuses_other_architectures_by_weight(tmp_path):
    from mrcnn_tf.weights import WeightsError, load_initial_weights

    _, old = _model()
    _save_run(old, tmp_path)
    _, wider = _model(["model.fpn.channels=32", "model.rpn.conv_channels=32"])
    with pytest.raises(WeightsError, match=r"fpn/lateral\d/kernel: \(1, 1, \d+, 64\) in the "
                                           r"checkpoint, \(1, 1, \d+, 32\) in the model"):
        load_initial_weights(wider, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing is not a run directory, a checkpoint"):
        load_initial_weights(wider, str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty has no checkpoints/"):
        load_initial_weights(wider, str(tmp_path / "empty"))


@pytest.mark.slow
@pytest.mark.parametrize("classes", ["other", "coco"])
def test_fine_tune_converted_torchvision_model(tmp_path, shared_data, classes):
    """The README's paths: convert torchvision's COCO model (its reduced-width fixture here),
    then train.py --set model.init_from=RUN on a COCO-format dataset. The frozen backbone is
    accepted because it is initialised. With other classes (model.num_classes=80, contiguous)
    the class layers are re-initialised and named; on COCO's own category ids (an 80-category
    JSON) the 90 classes and their layers carry over, and the run's labels are
    torchvision's."""
    from mrcnn_tf.tools.convert_torchvision import convert
    from tests.parity import torchvision_inference as tp

    with np.load(REPO / "tests" / "fixtures" / "torchvision_maskrcnn_small.npz") as f:
        np.savez(tmp_path / "tv.npz", **{k[3:]: f[k] for k in f.files if k.startswith("sd/")})
    convert(str(tmp_path / "tv.npz"), str(tmp_path / "coco"), None, tp.small_overrides())
    tiny = shared_data / "coco_tiny16"
    other = ["model.num_classes=80", "data.class_ids=contiguous"] if classes == "other" else []
    res = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config",
         str(REPO / "configs" / "torchvision_r50_fpn.yaml"), "--mode", "train", "--model_dir",
         str(tmp_path / "ft"), "--verbose", "0", "--set", *tp.small_overrides(),
         f"model.init_from={tmp_path / 'coco'}", *other,
         f"data.train.annotation_file={tiny}/instances_train2017.json",
         f"data.train.image_dir={tiny}/train2017", "train.batch_size=1",
         "train.steps=2", "train.checkpoint_every=2", "model.rpn.post_nms_topk_train=200",
         "model.rpn.pre_nms_topk_train=200"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert res.returncode == 0, res.stderr[-3000:]
    layers = ("box_head/class_logits/kernel", "box_head/box_deltas/kernel",
              "mask_head/mask_logits/kernel")
    labels = json.loads((tmp_path / "ft" / "labels.json").read_text())
    if classes == "other":
        assert (f"initialised from {tmp_path / 'coco'}; re-initialised (shape differs): "
                in res.stdout)
        for layer in layers:
            assert layer in res.stdout
        assert len(labels) == 80 and labels[11]["id"] == 13  # contiguous: the 12th category
    else:
        assert f"initialised from {tmp_path / 'coco'}\n" in res.stdout
        assert "re-initialised" not in res.stdout
        assert labels == json.loads((tmp_path / "coco" / "labels.json").read_text())
        assert [e["id"] for e in labels] == list(range(1, 91))
    with open(tmp_path / "ft" / "summary.json") as f:
        assert json.load(f)["final_step"] == 2


def _small_torchvision(shared_data, extra=()):
    """The reduced-width torchvision model with its fixture's weights (80 fresh classes), on
    coco_tiny16."""
    from mrcnn_tf.weights import load_torchvision
    from tests.parity import torchvision_inference as tp

    tiny = shared_data / "coco_tiny16"
    cfg = mrcnn_tf.load_config(REPO / "configs" / "torchvision_r50_fpn.yaml", [
        *tp.small_overrides(), "model.num_classes=90", "data.class_ids=contiguous",
        "train.batch_size=2",
        f"data.train.annotation_file={tiny}/instances_train2017.json",
        f"data.train.image_dir={tiny}/train2017", "data.max_instances=32",
        "data.train.source=coco", *extra])
    keras.utils.set_random_seed(0)
    model = mrcnn_tf.build_model(cfg)
    with np.load(REPO / "tests" / "fixtures" / "torchvision_maskrcnn_small.npz") as f:
        load_torchvision(model, {k[3:]: f[k] for k in f.files if k.startswith("sd/")})
    model = mrcnn_tf.with_num_classes(model, 80)
    return model.config, model


def test_grouped_batch_losses_combine_single_image_losses(shared_data):
    """A batch of two photos on one canvas, sampling off: each loss of the batch is the
    count-weighted mean of the two images' own losses on that canvas (no leakage between the
    images of a batch, the references' normalisation)."""
    cfg, model = _small_torchvision(shared_data, [
        "model.rpn.batch_size_per_image=null", "model.box_head.batch_size_per_image=null",
        "data.hflip=false"])
    images, targets = next(iter(build_dataset(cfg, training=True)))

    def run(sl):
        part = tf.nest.map_structure(lambda t: t[sl], targets)
        losses, t = model.forward_train(images[sl], part, training=True, return_targets=True)
        counts = {"loss_rpn_objectness": t["rpn"]["sampled"], "loss_rpn_box": t["rpn"]["sampled"],
                  "loss_box_class": t["rois"]["valid"], "loss_box_reg": t["rois"]["valid"],
                  "loss_mask": t["rois"]["foreground"]}
        return ({k: float(v) for k, v in losses.items()},
                {k: float(tf.reduce_sum(tf.cast(v, tf.float32))) for k, v in counts.items()})

    both, n_both = run(slice(0, 2))
    singles = [run(slice(b, b + 1)) for b in range(2)]
    for k in LOSS_KEYS:
        combined = sum(loss[k] * n[k] for loss, n in singles) / n_both[k]
        assert n_both[k] == sum(n[k] for _, n in singles)
        assert both[k] == pytest.approx(combined, rel=1e-5), k


@pytest.mark.slow
def test_fit_traces_once_per_canvas(shared_data, caplog):
    """model.fit over batches of several canvases (the shapes-sized model on coco_tiny16's
    photos, short side 96, long side <= 128): one trace of the training step per canvas shape
    (static shapes), each logged, and the losses stay finite."""
    import logging

    tiny = shared_data / "coco_tiny16"
    cfg = mrcnn_tf.load_config(SHAPES, [
        "model.num_classes=80", "data.train.source=coco",
        f"data.train.annotation_file={tiny}/instances_train2017.json",
        f"data.train.image_dir={tiny}/train2017", "data.max_instances=32",
        "model.preprocess.resize=short_long", "model.preprocess.short_size=96",
        "model.preprocess.long_size=128", "data.canvas_long_sides=[96, 128]",
        "train.batch_size=2"])
    keras.utils.set_random_seed(0)
    model = mrcnn_tf.build_model(cfg)
    model.compile()
    with caplog.at_level(logging.INFO, logger="mrcnn_tf"):
        hist = model.fit(build_dataset(cfg, training=True), steps_per_epoch=8, epochs=1,
                         verbose=0)
    traced = [r.getMessage() for r in caplog.records if "tracing the training step" in r.message]
    print("\n".join(traced))
    shapes = [m.split("input shape ")[1].split(" (")[0] for m in traced]
    assert len(shapes) == len(set(shapes)) >= 2
    assert set(shapes) <= {"(2, 96, 96, 3)", "(2, 96, 128, 3)", "(2, 128, 96, 3)"}
    assert all(np.isfinite(v[-1]) for v in hist.history.values())


def test_step_logger_logs_steps_not_epochs():
    """A line every log_every optimiser steps and at the last one, across Keras' epochs (a
    step-based run uses them only to schedule checkpoints)."""
    import io

    import keras

    from mrcnn_tf.training import StepLogger

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 1), np.float32)
    out = io.StringIO()
    model.fit(x, y, batch_size=1, epochs=3, verbose=0, callbacks=[StepLogger(5, 12, out)])
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["5/12", "10/12", "12/12"]
    assert all(" loss " in line and "s/step ETA " in line for line in lines)
    assert lines[-1].endswith("ETA 0:00:00") and "Epoch" not in out.getvalue()


def test_tpu_strategy_without_a_tpu_says_so():
    """--strategy tpu is offered (the step compiles with XLA, tests/test_xla.py); on a machine
    without a TPU it fails at once with the reason, before any model is built."""
    from mrcnn_tf.training import STRATEGIES, make_strategy

    assert "tpu" in STRATEGIES
    with pytest.raises(ValueError, match="--strategy tpu: no TPU found"):
        make_strategy("tpu")


def test_xla_over_logical_cpu_replicas_is_refused_with_the_reason():
    """XLA cannot run mirrored over logical CPU devices (plain Keras fails the same way): the
    run stops before building anything, naming the setting; one CPU or several GPUs pass."""
    import types

    from mrcnn_tf.training import check_xla_devices

    def strategy(*devices):
        return types.SimpleNamespace(num_replicas_in_sync=len(devices),
                                     extended=types.SimpleNamespace(worker_devices=devices))

    cpus = strategy("/job:localhost/replica:0/task:0/device:CPU:0",
                    "/job:localhost/replica:0/task:0/device:CPU:1")
    with pytest.raises(ValueError, match="train.jit_compile=true cannot run mirrored"):
        check_xla_devices(cpus, True)
    check_xla_devices(cpus, False)
    check_xla_devices(strategy("/job:localhost/replica:0/task:0/device:CPU:0"), True)
    check_xla_devices(strategy("/device:GPU:0", "/device:GPU:1"), True)
    # The default strategy (what train.py uses without --strategy) has no worker_devices.
    for jit in (False, True):
        check_xla_devices(tf.distribute.get_strategy(), jit)


def test_keras_conventions_compile_callbacks_and_predict():
    """What a Keras user tries: metrics in compile are refused with the way to COCO AP; a
    callback that sets the learning rate is refused before a step under the config's schedule
    and drives a constant-rate optimiser; predict on a finite dataset gives every batch without
    Keras' "ran out of data" warning (kept when steps outrun the data)."""
    import warnings

    from mrcnn_tf.optim import build_optimizer

    cfg, model = _model()
    with pytest.raises(ValueError, match="CocoMetricCallback"):
        model.compile(metrics=["accuracy"])
    with pytest.raises(ValueError, match="computes its five losses itself"):
        model.compile(loss="mse")
    scheduler = keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.004 / (epoch + 1))
    with pytest.raises(ValueError, match=r"LearningRateScheduler.*schedule=False"):
        model.fit(build_dataset(cfg, True), steps_per_epoch=1, epochs=1, verbose=0,
                  callbacks=[scheduler])
    assert int(model.optimizer.iterations) == 0
    model.compile(optimizer=build_optimizer(cfg.train, schedule=False))
    hist = model.fit(build_dataset(cfg, True), steps_per_epoch=1, epochs=2, verbose=0,
                     callbacks=[scheduler])
    assert hist.history["learning_rate"] == pytest.approx([0.004, 0.002])
    images = build_dataset(cfg, False).map(lambda i, t: i)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = model.predict(images, verbose=0)
    assert out["detection_boxes"].shape[0] == 4  # data.eval.num_images
    assert not [w for w in seen if "ran out of data" in str(w.message)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model.predict(images, steps=5, verbose=0)  # 2 batches exist
    assert [w for w in seen if "ran out of data" in str(w.message)]


def test_a_class_above_num_classes_from_a_users_pipeline_is_refused_before_the_step():
    cfg, model = _model()
    images, targets = next(iter(build_dataset(cfg, True)))
    bad = dict(targets, gt_classes=tf.where(targets["gt_classes"] == 2, 7,
                                            targets["gt_classes"]))
    ds = tf.data.Dataset.from_tensors((images, bad)).repeat()
    with pytest.raises(ValueError, match=r"gt_classes'\] holds class 7, but the model has 3 "
                                         r"classes.*model\.num_classes=7"):
        model.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)
    assert int(model.optimizer.iterations) == 0


@pytest.mark.slow
def test_coco_ap_in_fit_history_for_keras_callbacks(tmp_path):
    """CocoMetricCallback puts COCO box and mask AP into each epoch's logs, so that History,
    EarlyStopping and ModelCheckpoint(save_best_only) after it see them; its numbers are
    those of evaluate() on the same model."""
    from mrcnn_tf.evaluation import CocoMetricCallback
    from mrcnn_tf.evaluation.run import evaluate, model_predict_fn

    cfg, model = _model(["model.detection.score_threshold=0.0"])
    best = tmp_path / "best.weights.h5"
    hist = model.fit(build_dataset(cfg, True), steps_per_epoch=2, epochs=2, verbose=0,
                     callbacks=[
                         CocoMetricCallback(cfg),
                         keras.callbacks.EarlyStopping(monitor="val_segm_AP", mode="max",
                                                       patience=3),
                         keras.callbacks.ModelCheckpoint(str(best), monitor="val_segm_AP",
                                                         mode="max", save_best_only=True,
                                                         save_weights_only=True)])
    for key in ("val_bbox_AP", "val_bbox_AP50", "val_segm_AP", "val_segm_APl"):
        assert len(hist.history[key]) == 2 and all(-1 <= v <= 1 for v in hist.history[key])
    assert best.exists()
    again = evaluate(model_predict_fn(model), cfg)
    assert hist.history["val_bbox_AP"][-1] == pytest.approx(again["bbox"]["AP"])
    assert hist.history["val_segm_AP50"][-1] == pytest.approx(again["segm"]["AP50"])
    with pytest.raises(Exception, match=r"data\.eval\.annotation_file"):
        CocoMetricCallback(mrcnn_tf.load_config(SHAPES, ["data.eval.source=coco"]))


@pytest.mark.slow
def test_small_machine_recipe_trains_on_real_photos(shared_data, tmp_path):
    """configs/coco_small_cpu.yaml, as docs/training.md gives it for a user's COCO JSON (here
    coco_tiny16, 80 categories): from random weights, batches on its 320 x {320, 416, 512}
    canvases, finite losses, a checkpoint and the run's labels."""
    from mrcnn_tf.data.pipeline import canvases
    from mrcnn_tf.training import train

    tiny = shared_data / "coco_tiny16"
    cfg = mrcnn_tf.load_config(REPO / "configs" / "coco_small_cpu.yaml", [
        f"data.train.annotation_file={tiny}/instances_train2017.json",
        f"data.train.image_dir={tiny}/train2017", "train.steps=3", "train.checkpoint_every=3",
        "train.batch_size=2"])
    assert set(canvases(cfg)) == {(320, 320), (320, 416), (416, 320), (320, 512), (512, 320)}
    model, summary = train(cfg, tf.distribute.get_strategy(), str(tmp_path / "run"), verbose=0)
    assert summary["final_step"] == 3 and summary["stopped_on_nan"] is None
    assert all(np.isfinite(v) for v in summary["final_logs"].values())
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert len(labels) == 80 and labels[0]["name"] == "person"
