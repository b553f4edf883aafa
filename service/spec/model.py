"""``ExperimentSpec``: every section, and the rules that span sections."""

from typing import Annotated, Any

from pydantic import Field, StringConstraints, model_validator

from algorithms._config import StrictModel
from algorithms.merging.config import MergeConfig
from algorithms.optimizers.config import OptimizerConfig
from algorithms.peft.config import PeftConfig
from service.spec.checkpoints import CheckpointsSpec
from service.spec.code import CodeSpec
from service.spec.derived import Derived, derive, exchange_layout, needs_robust_exchange, worker_resources
from service.spec.derived import zero_stage as requested_zero_stage
from service.spec.distributed import DeepSpeedSpec, DistributedSpec
from service.spec.faults import FaultsSpec
from service.spec.retry import RetrySpec
from service.spec.sweep import SweepSpec
from service.spec.task import TaskSpec
from service.spec.train import TrainSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
PROJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TagKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TagValue = Annotated[str, StringConstraints(max_length=512)]


class ExperimentSpec(StrictModel):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=10_000)
    priority: int = Field(default=0, ge=-100, le=100, description="higher runs first")
    project: str = Field(default="default", pattern=PROJECT_PATTERN,
                         description="the group the experiment is listed and tracked in (one MLflow experiment each)")
    tags: dict[TagKey, TagValue] = Field(default_factory=dict, max_length=10_000,
                                         description="searchable: GET /v1/experiments?tag=key:value")
    task: TaskSpec
    train: TrainSpec | None = None
    optimizer: OptimizerConfig | None = None
    peft: PeftConfig | None = None
    merge: MergeConfig | None = None
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    faults: FaultsSpec = Field(default_factory=FaultsSpec)
    sweep: SweepSpec | None = None
    retry: RetrySpec | None = Field(default=None, description="start a failed job again, by kind of failure")
    checkpoints: CheckpointsSpec | None = Field(default=None, description="retention of the run's checkpoints "
                                                "(default: the 2 latest)")
    code: CodeSpec | None = Field(default=None, description="the user's code shipped with the run (bundle) "
                                  "and the job's Python requirements")

    @model_validator(mode="after")
    def _cross_section_rules(self) -> "ExperimentSpec":
        if self.task.kind == "merge":
            self._check_merge()
        elif self.task.kind == "command":
            self._check_command()
        else:
            self._check_training()
        return self

    # ---- command -----------------------------------------------------------------------------

    def _check_command(self) -> None:
        """A command is one process: the Ray job, reserving ``distributed.resources_per_worker``."""
        for section, key in (("train", "max_steps"), ("optimizer", "name"), ("peft", "name"), ("merge", "method")):
            if getattr(self, section) is not None:
                raise ValueError(f"{section}.{key}: {section} does not apply to task.kind 'command' (the script "
                                 "trains itself)")
        dist = self.distributed
        if dist.num_workers != 1 or dist.strategy != "ddp" or dist.deepspeed is not None:
            raise ValueError("distributed.num_workers: a command runs as one process (the job); give what it "
                             "reserves in distributed.resources_per_worker")
        if dist.aggregator is not None or dist.gradient_coding is not None or dist.exchange not in ("auto", "none"):
            raise ValueError("distributed.aggregator: robust aggregation and gradient coding apply to training "
                             "tasks, not to a command")
        faults = self.faults
        if faults.byzantine is not None or faults.stragglers is not None or faults.kill is not None:
            raise ValueError("faults.byzantine: simulated faults apply to training tasks, not to a command")
        if faults.fail_job is not None:
            raise ValueError("faults.fail_job: simulated job failures apply to training tasks, not to a command")
        if self.checkpoints is not None:
            raise ValueError("checkpoints.keep_latest: a command's checkpoints are its own (no checkpoints section)")
        if self.sweep is not None:
            for path in self.sweep.parameters:
                if not path.startswith("task.params."):
                    raise ValueError(f"sweep.parameters.{path}: a command's sweep ranges over task.params.* "
                                     "(the values its {name} fields take)")

    # ---- merge -------------------------------------------------------------------------------

    def _check_merge(self) -> None:
        if self.merge is None:
            raise ValueError("merge.method: task.kind 'merge' needs a merge section")
        if self.merge.NEEDS_BASE and self.merge.base is None:
            raise ValueError(f"merge.base: required by merge.method {self.merge.method!r}")
        for section in ("optimizer", "peft"):
            if getattr(self, section) is not None:
                raise ValueError(f"{section}.name: {section} does not apply to task.kind 'merge'")
        if self.sweep is not None:
            for path in self.sweep.parameters:
                if not path.startswith(("merge.", "task.")) and path != "merge":
                    raise ValueError(f"sweep.parameters.{path}: a merge's sweep ranges over merge and task paths")
        if self.faults.fail_job is not None:
            raise ValueError("faults.fail_job: simulated job failures apply to training tasks, not to a merge")
        if self.checkpoints is not None:
            raise ValueError("checkpoints.keep_latest: a merge makes no checkpoints")

    # ---- training ----------------------------------------------------------------------------

    def _check_training(self) -> None:
        if self.merge is not None:
            raise ValueError("merge.method: merge applies only to task.kind 'merge'")
        if self.train is None:
            raise ValueError(f"train.max_steps: train is required for task.kind {self.task.kind!r}")
        if self.optimizer is None:
            raise ValueError(f"optimizer.name: optimizer is required for task.kind {self.task.kind!r}")
        train, dist = self.train, self.distributed
        n = dist.num_workers
        self._check_checkpoints()
        if train.precision == "fp16" and not dist.use_gpu:
            raise ValueError("train.precision: fp16 needs distributed.use_gpu (use bf16 or fp32 on CPU)")
        if train.batch_size < n * train.grad_accum:
            raise ValueError(
                f"train.batch_size: {train.batch_size} must be at least num_workers x grad_accum "
                f"({n} x {train.grad_accum})"
            )
        if self.peft is not None:
            if self.task.kind not in ("causal_lm", "seq_classification", "custom"):
                raise ValueError(f"peft.name: peft applies to causal_lm, seq_classification and custom tasks "
                                 f"(a transformers model), not {self.task.kind!r}")
            if dist.strategy == "parameter_server":
                raise ValueError("peft.name: peft is not supported with strategy parameter_server "
                                 "(use ddp or deepspeed)")
        zero = dist.deepspeed.zero_stage if dist.deepspeed else None
        if dist.deepspeed is not None and dist.strategy != "deepspeed":
            raise ValueError("distributed.deepspeed: set but distributed.strategy is not 'deepspeed'")
        if dist.strategy == "deepspeed":
            from service.spec.deepspeed_rules import check_deepspeed

            check_deepspeed(self)
        if self.peft is not None:
            try:
                self.peft.check_distributed(dist.strategy, zero, n, train.precision)
            except ValueError as exc:
                raise ValueError(f"peft.name: {exc}") from None
        try:
            self.optimizer.check_distributed(dist.strategy, zero, train.precision)
        except ValueError as exc:
            raise ValueError(f"optimizer.name: {self.optimizer.name!r}: {exc}") from None
        self._check_exchange()
        self._check_faults()

    def _check_exchange(self) -> None:
        dist = self.distributed
        n = dist.num_workers
        if dist.exchange not in ("auto", "none") and dist.strategy == "parameter_server":
            raise ValueError(
                f"distributed.exchange: {dist.exchange!r} applies to strategy ddp or deepspeed; under "
                "parameter_server the server gathers the workers' gradients itself (leave it 'auto')"
            )
        if dist.exchange == "none" and dist.strategy != "parameter_server" and needs_robust_exchange(self):
            raise ValueError(
                "distributed.exchange: 'none', but a robust aggregator or a gradient attack combines every "
                "rank's whole gradient: use 'auto', 'gather' or 'shard'"
            )
        if dist.aggregator is not None:
            try:
                dist.aggregator.validate_for(n)
            except ValueError as exc:
                raise ValueError(f"distributed.aggregator.f: {exc}") from None
        if dist.gradient_coding is not None:
            try:
                dist.gradient_coding.validate_for(n)
            except ValueError as exc:
                raise ValueError(f"distributed.gradient_coding.stragglers: {exc}") from None
            if dist.strategy != "parameter_server":
                raise ValueError(
                    "distributed.gradient_coding: needs strategy parameter_server (the server decodes "
                    "from the first n - s workers to answer; collectives wait for every rank)"
                )
            agg = dist.aggregator
            coding = dist.gradient_coding
            if agg is not None and agg.ROBUST and not coding.MESSAGES_ESTIMATE_THE_GRADIENT:
                raise ValueError(
                    f"distributed.aggregator: robust rule {agg.name!r} combines only with gradient_coding scheme "
                    "fractional_repetition (each worker then sends an unbiased estimate of the full "
                    "gradient that the rule can compare); coded messages of "
                    f"{coding.scheme!r} mix parts with signed weights"
                )
            if agg is not None and agg.ROBUST:
                try:  # the rule sees only the n - s messages that arrive first
                    agg.validate_for(n - coding.stragglers)
                except ValueError as exc:
                    raise ValueError(f"distributed.aggregator.f: with gradient_coding.stragglers="
                                     f"{coding.stragglers} only n - s = {n - coding.stragglers} messages "
                                     f"reach the rule: {exc}") from None
            assert self.train is not None
            if self.train.batch_size < coding.min_batch_size(n):
                raise ValueError(
                    f"train.batch_size: {self.train.batch_size} is too small for gradient_coding scheme "
                    f"{coding.scheme!r} with {n} workers: each data part needs a sample, so at least "
                    f"{coding.min_batch_size(n)}"
                )
            byz = self.faults.byzantine
            if coding.SEQUENTIAL and byz is not None and byz.attacks_gradients:
                raise ValueError(
                    f"faults.byzantine.attack: gradient attacks are not simulated with the sequential "
                    f"gradient code {coding.scheme!r} (its messages are per-task partial sums); use a "
                    "one-shot scheme or the label_flip attack"
                )
        if dist.strategy == "parameter_server":
            self._check_parameter_server()
        elif dist.placement == "in_process":
            raise ValueError("distributed.placement: 'in_process' simulates the workers of strategy "
                             f"parameter_server; {dist.strategy} ranks are processes (leave it 'actors')")

    def _check_checkpoints(self) -> None:
        ckpt, train = self.checkpoints, self.train
        if ckpt is None or train is None:
            return
        if ckpt.keep_best and ckpt.keep_latest not in (None, 1):
            raise ValueError("checkpoints.keep_latest: with keep_best, the latest checkpoint is kept besides the "
                             "best ones (keep_latest must be 1 or left out)")
        if self.distributed.strategy == "parameter_server":
            raise ValueError("checkpoints.keep_latest: strategy parameter_server makes no checkpoints (use ddp)")
        if ckpt.keep_best and ckpt.metric.startswith("eval/"):
            every_eval = train.eval_every or train.max_steps
            every_ckpt = train.checkpoint_every or train.max_steps
            if every_ckpt % every_eval and every_ckpt != train.max_steps:
                raise ValueError(f"checkpoints.metric: {ckpt.metric} ranks checkpoints only if each comes with an "
                                 f"evaluation: train.checkpoint_every ({every_ckpt}) must be a multiple of "
                                 f"train.eval_every ({every_eval})")

    def _check_parameter_server(self) -> None:
        assert self.train is not None
        if self.faults.kill is not None:
            raise ValueError("faults.kill: strategy parameter_server has no checkpoint restarts (use ddp)")
        if self.faults.fail_job is not None:
            raise ValueError("faults.fail_job: strategy parameter_server has no checkpoints to resume from (use ddp)")
        if self.train.precision == "fp16":
            raise ValueError("train.precision: fp16 needs a loss scaler, which strategy parameter_server does "
                             "not run; use bf16 or fp32")
        if self.train.grad_accum != 1:
            raise ValueError("train.grad_accum: strategy parameter_server computes each data part in one "
                             "pass; set grad_accum to 1")

    def _check_faults(self) -> None:
        n = self.distributed.num_workers
        faults = self.faults
        for section in ("byzantine", "stragglers"):
            chosen = getattr(faults, section)
            if chosen is None:
                continue
            if chosen.ranks is not None and max(chosen.ranks, default=-1) >= n:
                raise ValueError(f"faults.{section}.ranks: must be below num_workers ({n})")
        if faults.byzantine is not None and faults.byzantine.n > n:
            raise ValueError(f"faults.byzantine.count: {faults.byzantine.n} exceeds num_workers ({n})")
        if faults.stragglers is not None and faults.stragglers.n >= n:
            raise ValueError(
                f"faults.stragglers.count: {faults.stragglers.n} must be below num_workers ({n})"
            )
        if faults.byzantine is not None and faults.byzantine.n > 0 and n < 2:
            raise ValueError("faults.byzantine.count: needs num_workers >= 2")
        if (faults.byzantine is not None and faults.byzantine.n > 0 and not faults.byzantine.attacks_gradients
                and self.task.kind == "custom"):
            raise ValueError(f"faults.byzantine.attack: {faults.byzantine.attack.name!r} rewrites a built-in task's "
                             "labels; a custom task's batches are the user's own: use a gradient attack")
        if faults.kill is not None:
            assert self.train is not None
            if faults.kill.rank >= n:
                raise ValueError(f"faults.kill.rank: {faults.kill.rank} must be below num_workers ({n})")
            if faults.kill.step >= self.train.max_steps:
                raise ValueError(
                    f"faults.kill.step: {faults.kill.step} must be below train.max_steps ({self.train.max_steps})"
                )
            if self.distributed.max_failures < 1:
                raise ValueError("distributed.max_failures: faults.kill needs max_failures >= 1 to recover")

    # ---- the resolved spec -------------------------------------------------------------------

    def resolve(self) -> "ExperimentSpec":
        """This spec with every derived value written in (``service.spec.derived``), validated
        again; resolving a resolved spec changes nothing."""
        raw = self.model_dump(mode="json")
        dist = raw["distributed"]
        dist["resources_per_worker"] = worker_resources(self.distributed)
        dist["exchange"] = exchange_layout(self)
        if self.distributed.strategy == "deepspeed" and self.distributed.deepspeed is None:
            dist["deepspeed"] = DeepSpeedSpec(zero_stage=requested_zero_stage(self) or 0).model_dump(mode="json")
        if self.train is not None:
            values = derive(self)
            raw["train"]["eval_every"] = values.eval_every
            raw["train"]["checkpoint_every"] = values.checkpoint_every
        return ExperimentSpec.model_validate(raw)

    def resolved(self) -> dict[str, Any]:
        """The resolved spec as JSON: every default and derived value filled in, as stored with the
        run and sent to workers."""
        return self.resolve().model_dump(mode="json")

    def derived(self) -> Derived:
        """What workers read for the values a spec may leave to a default (a training spec only)."""
        return derive(self)
