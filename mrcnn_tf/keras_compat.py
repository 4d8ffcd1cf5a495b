"""Where MaskRCNN departs from Keras 3.15's TensorFlow trainer, each with its reason and the
condition for removing it.

1. ``step_function``: the training and test functions that ``fit``/``evaluate`` call. Keras
   reads each batch inside one ``tf.function`` whose input shapes come from the dataset's
   element spec, so batches of several canvases (data.canvas_long_sides) would share one trace
   with unknown height and width. Here the batch is read eagerly and the step is a
   ``tf.function`` traced once per concrete input shape: one static-shape graph per canvas,
   a handful in all, each logged when first traced. Remove if Keras traces per input shape.
2. ``skip_symbolic_build``: Keras 3.15's ``fit`` averages the first data batch over replicas to
   trace a symbolic build; under MultiWorkerMirroredStrategy that collective fails on the image
   tensors (keras-team/keras#20585). The model's weights, optimiser and metrics are already
   built by ``build()`` and ``compile()``, so there is nothing to build. Remove once Keras skips
   built models itself (tests/test_training.py::test_multi_worker_* guards this).
4. ``quiet_end_of_data``: Keras 3.15's ``fit``/``evaluate``/``predict`` warn "Your input ran out
   of data" whenever a dataset of unknown cardinality ends, which every dataset with a filter or
   ``group_by_window`` (the canvases) does, though every batch was used. Silenced when no step
   count was asked for, so that it still warns when ``steps`` outran the data. Remove when Keras
   warns only for a shortfall.
3. ``multi_worker_logs``: Keras 3.15's ``fit`` reduces every log with
   ``strategy.reduce(MEAN, axis=0)`` under MultiWorkerMirroredStrategy, which fails on scalars
   (keras-team/keras#20585, tensorflow#72388). Logs of shape [1] make that reduce return the
   scalar (the values are the same on every replica). Remove when Keras reduces scalars itself.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import tensorflow as tf
from keras.src.backend.tensorflow.trainer import reduce_per_replica

logger = logging.getLogger("mrcnn_tf")


def step_function(model, step, what: str, jit_compile: bool = False, check=None):
    """``fn(iterator) -> logs`` running ``step`` (train_step or test_step) on the next batch
    under the model's distribution strategy, traced once per input shape; with
    ``jit_compile``, each replica's step is compiled by XLA (as Keras compiles it). ``check``:
    called eagerly on each batch before the step (it raises on a batch the step cannot take).

    The step is traced without AutoGraph: the model's code writes its loops and conditions
    with TensorFlow ops, and converting its functions took about a second of each trace."""
    if jit_compile and not model.run_eagerly:
        step = tf.function(step, jit_compile=True, autograph=False)

    @tf.autograph.experimental.do_not_convert
    def one_step_on_data(data):
        images = tf.nest.flatten(data)[0]
        if isinstance(images, tf.distribute.DistributedValues):
            images = images.values[0]  # per replica
        logger.info("tracing the %s step for input shape %s (once per canvas)", what,
                    tuple(images.shape))
        outputs = model.distribute_strategy.run(step, args=(data,))
        return reduce_per_replica(outputs, model.distribute_strategy, reduction="auto")

    if not model.run_eagerly:
        one_step_on_data = tf.function(one_step_on_data, reduce_retracing=False, autograph=False)

    def function(iterator):
        if isinstance(iterator, (tf.data.Iterator, tf.distribute.DistributedIterator)):
            optional = iterator.get_next_as_optional()
            if not optional.has_value():
                raise StopIteration
            data = optional.get_value()
            if check is not None:
                check(data)
            return one_step_on_data(data)
        outputs = None
        for data in iterator:  # train_on_batch / test_on_batch hand a one-batch generator
            if check is not None:
                check(data)
            outputs = one_step_on_data(data)
        return outputs

    return function


def skip_symbolic_build(model) -> bool:
    """Whether Keras' symbolic build can be skipped: everything is built already."""
    return bool(model.built and model.optimizer is not None and model.optimizer.built)


def multi_worker_logs(logs: dict) -> dict:
    """``logs`` as [1]-shaped tensors under MultiWorkerMirroredStrategy (see 3. above)."""
    strategy = tf.distribute.get_strategy()
    if (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode()):
        return {k: tf.reshape(v, [1]) for k, v in logs.items()}
    return logs


@contextlib.contextmanager
def quiet_end_of_data(steps):
    """Silences Keras' "Your input ran out of data" when ``steps`` is None (see 4. above)."""
    with warnings.catch_warnings():
        if steps is None:
            warnings.filterwarnings("ignore", message="Your input ran out of data")
        yield
