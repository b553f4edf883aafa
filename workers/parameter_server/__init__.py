"""``distributed.strategy: parameter_server``: a server loop in the job driver, one Ray actor per
worker, weights through the object store, gradients back, stragglers outwaited by coding.

Every step the server puts the flat weights in the object store once (``ray.put``) and asks each
worker for its message. What a worker computes depends on the spec:

* no ``gradient_coding``: worker ``i`` sends the summed-loss gradient of its own data part; the
  server waits for all ``n`` (wait-for-all) and averages them, or, with a robust
  ``distributed.aggregator`` (and simulated Byzantine workers), applies the rule to the ``n``
  per-worker mean gradients.
* a one-shot code (``fractional_repetition``, ``cyclic_repetition``, Tandon et al. 2017): worker
  ``i`` sends ``sum_j B[i, j] * g_j`` over its parts; the server waits for the first ``n - s``
  (``ray.wait``; it also takes any result already there), decodes the exact full-batch
  gradient (:func:`algorithms.coding.decode_gradient`) and steps. Late results are discarded. With
  ``fractional_repetition`` a robust rule may replace the decoder: it then sees the arrived
  workers' block gradients, each an unbiased estimate of the full gradient.
* a sequential code (``sequential_gc``, ``multiplexed_sgc``, Krishnan et al. 2023): job ``t``
  (the gradient of step ``t``) is computed at the weights of round ``t`` in rounds
  ``t .. t + T``. Each round the server waits ``(1 + patience)`` times the first worker's time,
  then declares the workers still missing stragglers if that keeps the pattern inside the
  (B, W, lambda)-bursty model, else waits for more (as the authors' simulator does). The code
  plans which unfinished tasks to repeat; results of declared stragglers are discarded (the
  schemes repeat work rather than reuse it). Job ``t``'s gradient is applied at the end of round
  ``t + T``, its deadline, whatever the stragglers did: the run is T-step delayed SGD,
  reproducible whatever the straggler pattern (the paper's experiments instead interleave
  T + 1 independent models).

Data: a step's global batch (``train.batch_size`` samples) is split into the code's parts (sizes
by the code's part fractions, largest remainder); part ``p`` is the stream
``task.batches(rank=p, world=n_parts, batch_size=size_p)``, which every worker that holds ``p``
replays identically, and its term is ``size_p * task.loss(part batch)`` (the summed loss), so the
decoded sum divided by the batch size is the mean-loss gradient of the whole batch. The RNG is
seeded per (job, part), so dropout masks agree between workers computing the same part. The loss
is decoded like the gradient (one more coordinate of each message).

Numerics: messages of codes with real coefficients (cyclic repetition) are combined and sent in
float64 from per-part gradients, so decoding amplifies no float32 rounding (see
``bench/RESULTS.md`` for the condition numbers); 0/1 codes send float32.

MLflow, per step: ``train/loss``, ``train/lr``, ``perf/step_time_s``, ``ps/wait_s``,
``ps/decode_s``, ``ps/num_late`` and ``ps/late/w<i>`` (1 for each worker that was late or
declared a straggler); eval metrics every ``train.eval_every``; the per-step record as the
artifact ``parameter_server/steps.jsonl``; the final model as ``model/``. With a sequential code
the ``ps/*`` metrics are logged per round (step = round + 1) and ``train/*`` per applied job.
Not supported here: checkpoints/restarts (``faults.kill``), optimizers that need extra forward
passes, fp16 (see the spec's rules).
"""

from workers.parameter_server.layout import Coeffs, Layout, WorkItem, part_sizes
from workers.parameter_server.pools import LocalPool, Pool, RayPool
from workers.parameter_server.server import ParameterServer, StepRecord, run_parameter_server
from workers.parameter_server.worker import AsyncGradientWorker, GradientWorker, from_wire, to_wire

__all__ = ["AsyncGradientWorker", "Coeffs", "GradientWorker", "Layout", "LocalPool", "ParameterServer", "Pool",
           "RayPool", "StepRecord", "WorkItem", "from_wire", "part_sizes", "run_parameter_server", "to_wire"]
