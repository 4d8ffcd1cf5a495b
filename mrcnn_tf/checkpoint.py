"""TensorFlow checkpoints of a model (and optimiser) as flat maps of variables.

tf.train.Checkpoint follows an object graph, and Keras 3 layers held in Python lists (FPN levels,
backbone blocks) are not part of that graph: checkpointing the model object silently drops their
weights. Keying every variable by its Keras path avoids that, and keeps the files independent of
how layers are nested.
"""

from __future__ import annotations

import logging

import tensorflow as tf

logger = logging.getLogger("mrcnn_tf")


def variable_key(path: str) -> str:
    return path.replace("/", ".")


def weight_tensor_name(path: str) -> str:
    """The name under which a checkpoint from :func:`make_checkpoint` stores the model weight
    at ``path`` (without the model's name: "box_head/fc1/kernel"). tf.train escapes "." in
    object names as "..".
    """
    return f"weights/{variable_key(path).replace('.', '..')}/.ATTRIBUTES/VARIABLE_VALUE"


def make_checkpoint(model, optimizer=None, legacy_optimizer_keys: bool = False
                    ) -> tf.train.Checkpoint:
    """A tf.train.Checkpoint of every weight of ``model`` (and ``optimizer``'s variables).

    ``legacy_optimizer_keys``: key the optimiser's variables with its Keras name in front, as
    checkpoints written before 2026-11-24 did (``restore`` falls back to it)."""
    weights = {variable_key(v.path.split("/", 1)[-1]): v for v in model.weights}
    if len(weights) != len(model.weights):
        raise ValueError("model weights have duplicate paths; cannot checkpoint them by path")
    kwargs = {"weights": weights}
    if optimizer is not None:
        # Without the optimiser's own name: Keras numbers it (sgd, sgd_1, ...) by how many were
        # created before in the process, which must not decide whether a checkpoint restores.
        slots = {variable_key(v.path if legacy_optimizer_keys else v.path.split("/", 1)[-1]): v
                 for v in optimizer.variables}
        if len(slots) != len(optimizer.variables):
            raise ValueError("optimizer variables have duplicate paths; cannot checkpoint them")
        kwargs["optimizer"] = slots
    return tf.train.Checkpoint(**kwargs)


def restore(model, path: str, optimizer=None) -> None:
    """Restores ``path`` into ``model`` (and ``optimizer``); every model weight must be in it.

    Optimiser state written by an older optimiser (Keras' SGD, whose ``momentum`` slots hold
    ``-lr * buffer`` instead of torch's buffer, before 2026-11-30) cannot be carried over: the
    weights and the step are restored, the momentum restarts from zero, and a warning says so.
    """
    status = make_checkpoint(model, optimizer).restore(path)
    if optimizer is None:
        status.expect_partial()  # a training checkpoint also holds optimiser slots
        status.assert_existing_objects_matched()
        return
    try:
        status.assert_existing_objects_matched()
        return
    except AssertionError:
        pass
    try:  # A checkpoint from before the optimiser's Keras name left the keys.
        make_checkpoint(model, optimizer, legacy_optimizer_keys=True).restore(
            path).assert_existing_objects_matched()
        return
    except AssertionError:
        pass
    weights = make_checkpoint(model).restore(path)
    weights.expect_partial()
    weights.assert_existing_objects_matched()
    steps = [n for n, _ in tf.train.list_variables(path) if n.startswith("optimizer/")
             and n.endswith("iteration/.ATTRIBUTES/VARIABLE_VALUE")]
    if steps:
        optimizer.iterations.assign(tf.train.load_variable(path, steps[0]))
    for v in optimizer.variables:
        if v is not optimizer.iterations:
            v.assign(tf.zeros_like(v))
    logger.warning("%s: its optimiser state is of an older optimiser; restored the weights and "
                   "step %d, the momentum restarts from zero", path,
                   int(optimizer.iterations.numpy()))
