"""FedScale job files: parsing, defaults and validation.

The compatibility contract is FedScale's YAML format: optional cluster keys at the top level
(``ps_ip``, ``exp_path``, ``aggregator_entry`` …) and ``job_conf``, a list of single-key maps (a plain
mapping is accepted too). Option names and defaults follow FedScale's ``config_parser.py``; keys
that FedScale's launcher or simulator use but a deployment daemon does not are accepted and reported
as ignored. Unlike FedScale, an unknown ``job_conf`` key is an error naming the nearest known key.

Pure logic: no I/O beyond parsing the text it is given.
"""

from __future__ import annotations

import difflib
import math
import re
import reprlib
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from fedscaled.core.strategies import POLICY_NAMES, STRATEGIES, canonical
from fedscaled.errors import InvalidConfig

# Top-level keys of a FedScale job file that configure FedScale's own launcher (ssh, conda,
# cluster layout). The daemon has no use for them: accepted, reported as ignored.
CLUSTER_KEYS = (
    "ps_ip",
    "ps_port",
    "exp_path",
    "aggregator_entry",
    "executor_entry",
    "auth",
    "setup_commands",
    "worker_ips",
    # FedScale's docker and Kubernetes launchers (benchmark/configs/{docker,k8s}_deploy)
    "use_container",
    "ports",
    "container_network",
    "data_path",
    "num_aggregators",
    "num_executors",
)
# FedScale's config_parser.py: a known data_set fixes the class count (``num_class``).
DATASET_CLASSES = {"Mnist": 10, "cifar10": 10, "imagenet": 1000, "emnist": 47, "openImg": 596,
                   "google_speech": 35, "femnist": 62, "yelp": 5}
EXPERIMENT_MODES = ("mobile", "deployment", "simulation")

JOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Bounds on untrusted job files, checked before anything is built from them: a 500-byte file of nested
# YAML aliases expands to gigabytes when walked (as printing a value for an error message would).
MAX_JOB_FILE_BYTES = 256 * 1024
MAX_YAML_ALIASES = 64
MAX_INPUT_DIM = 4096
_SHORT = reprlib.Repr()
_SHORT.maxstring = 60
_SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2
MODELS = ("linear", "mlp", "cnn", "mobilenetv3", "mobilenetv3_finetune")
SAMPLE_MODES = ("random", "oort")
GRADIENT_POLICIES = POLICY_NAMES
STALENESS_FUNCTIONS = ("sqrt", "constant", "polynomial")
WEIGHTINGS = ("samples", "uniform")
AGGREGATORS = ("fedavg", "median", "trimmed_mean", "krum")
ON_LOW_QUORUM = ("retry", "fail")


@dataclass(frozen=True)
class KeySpec:
    """One job key: its kind, its default, and whether the daemon acts on it."""

    kind: str  # int | float | str | bool | shape | choice
    default: Any
    doc: str
    used: bool = True
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None
    exclusive_min: bool = False


def _k(kind: str, default: Any, doc: str, **kw: Any) -> KeySpec:
    return KeySpec(kind, default, doc, **kw)


def _ignored(kind: str, default: Any, doc: str) -> KeySpec:
    return KeySpec(kind, default, doc, used=False)


# Every job key the daemon knows. `used=False` keys are FedScale keys accepted for compatibility
# and reported as ignored at submit. docs/config.md documents each (a test checks).
JOB_KEYS: dict[str, KeySpec] = {
    # --- identity and logging
    "job_name": _k("str", "demo_job", "Job name: letters, digits, '.', '_' and '-', at most 64 characters."),
    "log_path": _ignored("str", "./", "FedScale's log folder; the job log lives in the store (`fedscalectl logs`)."),
    "data_path": _ignored("str", "", "FedScale's data folder; devices hold their own data."),
    "experiment_mode": _k("str", "mobile", "FedScale's mode: `mobile` or `deployment` (the same here: devices "
                          "train); `simulation` is refused, this daemon runs no simulator.", choices=EXPERIMENT_MODES),
    "engine": _ignored("str", "pytorch", "FedScale's aggregation engine; aggregation here is always JAX."),
    # --- model
    "model": _k("choice", "linear", "Model from the zoo: linear, mlp, cnn, mobilenetv3 or mobilenetv3_finetune "
                "(docs/config.md, 'Models').", choices=MODELS),
    "width_multiplier": _k("float", 1.0, "MobileNetV3 width multiplier: channel counts are scaled by it (0.5 is "
                           "a phone-sized model).", minimum=0.0, maximum=2.0, exclusive_min=True),
    "pretrained": _k("str", "", "Initial weights: a safetensors file on the daemon's machine, or `job:NAME` for "
                     "the latest model of a finished job. Required by mobilenetv3_finetune (its frozen feature "
                     "extractor); tensors it lacks start from the zoo's initialisation."),
    "input_shape": _k("shape", (28, 28, 1), "Input shape of one sample, e.g. `32 32 3` (height width channels); "
                      "FedScale's 4-D form `1 3 28 28` (batch channels height width) is read as `28 28 3`."),
    "num_classes": _k("int", 35, "Number of output classes (FedScale's default is 35).", minimum=2,
                      maximum=100_000),
    # --- rounds and participants
    "rounds": _k("int", 50, "Number of training rounds.", minimum=1),
    "num_participants": _k("int", 4, "Updates accepted per round (the round closes at this count).", minimum=1),
    "overcommitment": _k("float", 1.3, "Devices selected per round = int(num_participants * overcommitment).",
                         minimum=1.0),
    "min_participants": _k("int", 0, "Fewest updates that make a round (0: half of num_participants, at least 1).",
                           minimum=0),
    "round_deadline": _k("float", 120.0, "Seconds a round waits for updates before it closes.", minimum=0.0,
                         exclusive_min=True),
    "on_low_quorum": _k("choice", "retry", "Below min_participants at the deadline: retry the round or fail the job.",
                        choices=ON_LOW_QUORUM),
    "max_round_retries": _k("int", 10, "How often one round may be retried before the job fails.", minimum=0),
    "eval_interval": _k("int", 5, "Evaluate the global model every this many rounds (and the initial model).",
                        minimum=1),
    "test_participants": _k("int", 0, "Devices asked to test the model (0: num_participants).", minimum=0),
    "sample_mode": _k("choice", "random", "Participant selection: random or oort.", choices=SAMPLE_MODES),
    "sample_seed": _k("int", 233, "Seed of participant selection.", minimum=0),
    "filter_less": _k("int", 32, "Devices with fewer local samples are not selected.", minimum=0),
    "filter_more": _k("int", 10**15, "Devices with more local samples are not selected.", minimum=0),
    "checkin_wait": _k("float", 20.0, "Longest a check-in waits for a round to open before 'come back later'.",
                       minimum=0.0),
    "selection_window": _k("float", 5.0, "Seconds the pool of waiting devices gathers before a round opens with "
                           "fewer devices than it would select (but at least min_participants).", minimum=0.0),
    "retry_min": _k("float", 5.0, "Shortest retry window (seconds) sent to devices told to come back later.",
                    minimum=0.0),
    "retry_max": _k("float", 60.0, "Longest retry window (seconds) sent to devices told to come back later.",
                    minimum=0.0),
    # --- device eligibility (defaults a phone user wants: train only on the charger, on Wi-Fi)
    "require_charging": _k("bool", True, "Only devices that are charging are selected."),
    "require_idle": _k("bool", False, "Only devices that report idle are selected."),
    "require_unmetered": _k("bool", True, "Only devices on an unmetered network are selected."),
    "min_battery": _k("int", 20, "Only devices with at least this battery percentage are selected.",
                      minimum=0, maximum=100),
    # --- aggregation
    "gradient_policy": _k("choice", "fed-avg", "Server strategy: fed-avg, fed-yogi, fed-adam, fed-adagrad, fed-avgm, "
                          "fed-prox or q-fedavg (docs/config.md, 'Strategies'; FedScale's yogi, prox, qfedavg and "
                          "fedavg spellings too).", choices=GRADIENT_POLICIES),
    "server_lr": _k("float", 0.0, "Server learning rate of fed-adam, fed-adagrad and fed-avgm (0: the strategy's "
                    "default, 0.01, 0.1 and 1.0); fed-yogi uses yogi_eta.", minimum=0.0),
    "server_momentum": _k("float", 0.9, "fed-avgm: server momentum.", minimum=0.0, maximum=1.0),
    "server_beta1": _k("float", 0.9, "fed-adam: first-moment decay.", minimum=0.0, maximum=1.0),
    "server_beta2": _k("float", 0.99, "fed-adam: second-moment decay.", minimum=0.0, maximum=1.0),
    "server_tau": _k("float", 1e-3, "fed-adam and fed-adagrad: adaptivity (the denominator's epsilon).",
                     minimum=0.0, exclusive_min=True),
    "clip_norm": _k("float", 0.0, "Clip each update's distance to the global model to this L2 norm (0: off). Any "
                    "strategy.", minimum=0.0),
    "noise_multiplier": _k("float", 0.0, "Central differential privacy: Gaussian noise of std 2 * noise_multiplier * "
                           "clip_norm / (updates in the round) on each round's model (0: off; needs clip_norm and "
                           "weighting uniform).", minimum=0.0),
    "dp_delta": _k("float", 1e-5, "Central differential privacy: the delta of the (epsilon, delta) reported.",
                   minimum=0.0, maximum=1.0, exclusive_min=True),
    "aggregator": _k("choice", "fedavg", "How a round's updates are combined: fedavg (weighted mean, streamed as "
                     "they arrive) or a Byzantine-robust rule over the stored updates: median, trimmed_mean, krum.",
                     choices=AGGREGATORS),
    "trim_fraction": _k("float", 0.1, "trimmed_mean: fraction of updates dropped at each end, per coordinate.",
                        minimum=0.0, maximum=0.49),
    "krum_f": _k("int", 1, "krum: number of hostile updates tolerated (needs min_participants >= krum_f + 3).",
                 minimum=0),
    "weighting": _k("choice", "samples", "FedAvg weights: samples (by sample count) or uniform (FedScale's).",
                    choices=WEIGHTINGS),
    "model_retention": _k("int", 10, "Keep this many latest model versions (0: keep all); asynchronous jobs keep "
                          "at least max_staleness + 1.", minimum=0),
    "checkpoint_interval": _k("int", 100, "Also keep every this-many-th model version (0: none beyond the latest "
                              "model_retention and version 0).", minimum=0),
    "save_checkpoint": _k("bool", False, "FedScale's checkpoint switch: true keeps every model version, overriding "
                          "model_retention and checkpoint_interval."),
    # --- local training, sent to devices in the task config
    "learning_rate": _k("float", 5e-2, "Device learning rate.", minimum=0.0, exclusive_min=True),
    "min_learning_rate": _k("float", 5e-5, "Floor of the decayed learning rate.", minimum=0.0),
    "decay_factor": _k("float", 0.98, "Multiply the learning rate by this every decay_round rounds.",
                       minimum=0.0, maximum=1.0, exclusive_min=True),
    "decay_round": _k("float", 10, "Rounds between learning-rate decays.", minimum=0.0, exclusive_min=True),
    "local_steps": _k("int", 20, "Local SGD steps per training task.", minimum=1),
    "epochs": _k("int", 0, "Local epochs instead of steps when > 0.", minimum=0),
    "batch_size": _k("int", 30, "Device training batch size.", minimum=1),
    "test_bsz": _k("int", 128, "Device test batch size.", minimum=1),
    "weight_decay": _k("float", 0.0, "L2 weight decay for device training.", minimum=0.0),
    "proxy_mu": _k("float", 0.1, "FedProx proximal term (used with gradient_policy fed-prox).", minimum=0.0),
    "yogi_eta": _k("float", 3e-3, "Yogi server learning rate.", minimum=0.0),
    "yogi_tau": _k("float", 1e-8, "Yogi adaptivity.", minimum=0.0),
    "yogi_beta": _k("float", 0.9, "Yogi first-moment decay.", minimum=0.0, maximum=1.0),
    "yogi_beta2": _k("float", 0.99, "Yogi second-moment decay.", minimum=0.0, maximum=1.0),
    "qfed_q": _k("float", 1.0, "q-FedAvg fairness parameter q (FedScale's default 1.0; 0: the unweighted mean).",
                 minimum=0.0),
    # --- asynchronous mode (selected by aggregator_entry: ...async_aggregator.py)
    "max_staleness": _k("int", 5, "Async mode: an update based on a model more than this many versions old is "
                        "refused.", minimum=0),
    "max_concurrency": _k("int", 10, "Async mode: most training tasks out at once (FedScale's default).",
                          minimum=1),
    "async_buffer": _k("int", 0, "Async mode: updates buffered per model version (0: num_participants).",
                       minimum=0),
    "staleness_function": _k("choice", "sqrt", "Async mode: an update's weight by its staleness s: sqrt "
                             "(1/sqrt(1+s), FedScale's), constant (1) or polynomial ((1+s)^-staleness_exponent).",
                             choices=STALENESS_FUNCTIONS),
    "staleness_exponent": _k("float", 0.5, "Async mode: the exponent of staleness_function polynomial.",
                             minimum=0.0),
    # --- Oort selection
    "exploration_factor": _k("float", 0.9, "Oort: initial fraction of participants picked for exploration.",
                             minimum=0.0, maximum=1.0),
    "exploration_decay": _k("float", 0.98, "Oort: decay of the exploration factor per round.", minimum=0.0,
                            maximum=1.0),
    "exploration_min": _k("float", 0.3, "Oort: floor of the exploration factor.", minimum=0.0, maximum=1.0),
    "exploration_alpha": _k("float", 0.3, "Oort: weight of staleness in a device's utility.", minimum=0.0),
    "pacer_delta": _k("float", 5, "Oort: pacer's step, in percentile points of device duration, when utility stalls.",
                      minimum=0.0),
    "pacer_step": _k("int", 20, "Oort: rounds between pacer adjustments.", minimum=1),
    "round_threshold": _k("float", 30, "Oort: percentile of device speed admitted.", minimum=0.0, maximum=100.0),
    "round_penalty": _k("float", 2.0, "Oort: penalty exponent for slow devices.", minimum=0.0),
    "cut_off_util": _k("float", 0.05, "Oort: utility cut-off.", minimum=0.0),
    "sample_window": _k("float", 5.0, "Oort: rounds of utility history.", minimum=0.0),
    "blacklist_rounds": _k("int", -1, "Oort: rounds after which a device is blacklisted (-1: never)."),
    "blacklist_max_len": _k("float", 0.3, "Oort: largest blacklisted fraction.", minimum=0.0, maximum=1.0),
    "clip_bound": _k("float", 0.9, "Oort: utility clipping percentile.", minimum=0.0, maximum=1.0),
    # --- enrollment
    "enrollment_token": _k("str", "", "Token devices present to enroll (generated at submit when empty)."),
    "enroll_rate_per_token": _k("float", 10.0, "Enrollments per second with the job's token, from all addresses "
                                "together (0: unlimited); beyond it 429 `rate_limited` with Retry-After.",
                                minimum=0.0),
    "enroll_burst_per_token": _k("int", 500, "Enrollments with the job's token allowed at once before "
                                 "enroll_rate_per_token applies.", minimum=1),
    "enroll_rate_per_address": _k("float", 1.0, "Enrollment attempts per second from one client address "
                                  "(0: unlimited; set 0 behind a reverse proxy, where every device has the "
                                  "proxy's address).", minimum=0.0),
    "enroll_burst_per_address": _k("int", 200, "Enrollment attempts from one address allowed at once before "
                                   "enroll_rate_per_address applies.", minimum=1),
    "max_devices": _k("int", 0, "Most devices (enrolled and not revoked) the job takes (0: unlimited); beyond "
                      "it enrollment answers 503 `overloaded`.", minimum=0),
    # --- FedScale simulator and cluster options: accepted for compatibility, no effect here
    "num_executors": _ignored("int", 1, "FedScale simulator executors."),
    "executor_configs": _ignored("str", "127.0.0.1:[1]", "FedScale simulator executors."),
    "use_cuda": _ignored("str", "True", "FedScale's GPU switch."),
    "cuda_device": _ignored("str", "", "FedScale's GPU choice."),
    "data_set": _k("str", "cifar10", "FedScale's data set name; a known one (Mnist, cifar10, imagenet, emnist, "
                   "openImg, google_speech, femnist, yelp) sets num_classes when the file does not, as in FedScale. "
                   "Devices hold their own data."),
    "data_dir": _ignored("str", "~/cifar10/", "FedScale simulator dataset folder."),
    "data_map_file": _ignored("str", "", "FedScale simulator client map."),
    "device_conf_file": _ignored("str", "/tmp/client.cfg", "FedScale simulator device profile."),
    "device_avail_file": _ignored("str", "", "FedScale simulator availability trace."),
    "task": _ignored("str", "cv", "FedScale task family."),
    "model_zoo": _ignored("str", "torchcv", "FedScale model zoo."),
    "num_loaders": _ignored("int", 2, "FedScale data loaders."),
    "time_stamp": _ignored("str", "logs", "FedScale log folder suffix."),
    "this_rank": _ignored("int", 1, "FedScale process rank."),
    "connection_timeout": _ignored("int", 60, "FedScale gRPC timeout."),
    "backend": _ignored("str", "gloo", "FedScale torch.distributed backend."),
    "clock_factor": _ignored("float", 1.0, "FedScale simulator clock factor."),
    "test_ratio": _ignored("float", 1.0, "FedScale simulator test ratio."),
    "loss_decay": _ignored("float", 0.2, "FedScale loss smoothing."),
    "upload_step": _ignored("int", 20, "FedScale upload step."),
    "dump_epoch": _ignored("int", 10**10, "FedScale checkpoint interval."),
    "model_size": _ignored("float", 65536, "FedScale simulated model size."),
    "train_uniform": _ignored("bool", False, "FedScale simulator option."),
    "conf_path": _ignored("str", "~/dataset/", "FedScale simulator option."),
    "wandb_token": _ignored("str", "", "FedScale's Weights & Biases token."),
    "checkin_period": _ignored("int", 50, "FedScale async simulator option."),
    "arrival_interval": _ignored("int", 3, "FedScale async simulator option."),
    "async_mode": _ignored("bool", False, "FedScale async switch; use aggregator_entry instead."),
    "malicious_factor": _ignored("int", 10**15, "FedScale simulator option."),
    "noise_factor": _ignored("float", 0.1, "FedScale differential-privacy option."),
    "clip_threshold": _ignored("float", 3.0, "FedScale differential-privacy option."),
    "target_delta": _ignored("float", 1e-4, "FedScale differential-privacy option."),
    "input_dim": _ignored("int", 0, "FedScale NLP option."),
    "output_dim": _ignored("int", 0, "FedScale NLP option."),
    "embedding_file": _ignored("str", "", "FedScale NLP option."),
    "adam_epsilon": _ignored("float", 1e-8, "FedScale NLP option."),
    "block_size": _ignored("int", 64, "FedScale NLP option."),
    "clf_block_size": _ignored("int", 32, "FedScale NLP option."),
    "vocab_token_size": _ignored("int", 10000, "FedScale NLP option."),
    "vocab_tag_size": _ignored("int", 500, "FedScale NLP option."),
}


@dataclass(frozen=True)
class JobConfig:
    """A validated job: every known key with its value (defaults filled in)."""

    name: str
    values: Mapping[str, Any]
    mode: str  # "sync" | "async"
    ignored: tuple[str, ...] = ()
    source_text: str = ""

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def min_participants(self) -> int:
        """The quorum: the configured value, else half of num_participants (at least 1)."""
        configured = int(self.values["min_participants"])
        target = int(self.values["num_participants"])
        return min(configured, target) if configured > 0 else max(1, math.ceil(target / 2))

    @property
    def selected_per_round(self) -> int:
        """How many devices are selected per round (FedScale's overcommitment)."""
        return max(int(self.values["num_participants"] * self.values["overcommitment"]),
                   int(self.values["num_participants"]))

    def to_record(self) -> dict[str, Any]:
        """JSON-able form for the store (input_shape as a list)."""
        values = dict(self.values)
        values["input_shape"] = list(values["input_shape"])
        return {"name": self.name, "values": values, "mode": self.mode, "ignored": list(self.ignored),
                "source_text": self.source_text}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> JobConfig:
        """Inverse of :meth:`to_record`."""
        values = dict(record["values"])
        values["input_shape"] = tuple(values["input_shape"])
        return cls(name=record["name"], values=values, mode=record["mode"],
                   ignored=tuple(record.get("ignored", ())), source_text=record.get("source_text", ""))


@dataclass
class _Parse:
    values: dict[str, Any] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def nearest_key(key: str, known: list[str] | tuple[str, ...] | None = None) -> str | None:
    """The known job key closest to ``key`` (for "did you mean" messages), or None."""
    pool = list(known) if known is not None else list(JOB_KEYS)
    close = difflib.get_close_matches(key, pool, n=1, cutoff=0.5)
    return close[0] if close else None


def _describe(value: Any) -> str:
    """A short, bounded rendering of an untrusted value for an error message."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return "an integer of over 30 digits"
    return _SHORT.repr(value) if isinstance(value, str | list | tuple | dict) else _SHORT.repr(value).strip("'")


def _convert(key: str, spec: KeySpec, raw: Any) -> Any:
    """Convert and range-check one value; raise InvalidConfig with a one-line message."""
    if raw is None and spec.kind == "str":
        return ""
    converters: dict[str, Callable[[Any], Any]] = {
        "int": _as_int, "float": _as_float, "bool": _as_bool, "shape": _as_shape,
        "str": _as_str, "choice": _as_str,
    }
    try:
        value = converters[spec.kind](raw)
    except (TypeError, ValueError) as exc:
        expected = {"int": "an integer", "float": "a number", "bool": "true or false",
                    "shape": f"1 to 4 integers in [1, {MAX_INPUT_DIM}] separated by spaces (e.g. 32 32 3)",
                    "str": "a string", "choice": "a string"}[spec.kind]
        raise InvalidConfig(f"{key} must be {expected}, got {_describe(raw)}", key=key) from exc
    if spec.choices and value not in spec.choices:
        raise InvalidConfig(f"{key} must be one of {', '.join(spec.choices)}, got {_describe(raw)}", key=key)
    if spec.kind in ("int", "float"):
        _check_range(key, spec, value)
    return value


def _check_range(key: str, spec: KeySpec, value: float) -> None:
    if spec.kind == "float" and not math.isfinite(value):
        raise InvalidConfig(f"{key} must be a finite number, got {value}", key=key)
    low = spec.minimum
    if low is not None and (value < low or (spec.exclusive_min and value == low)):
        if spec.kind == "int" and low == 1:
            what = "a positive integer"
        elif spec.kind == "int" and low == 0:
            what = "a non-negative integer"
        elif spec.exclusive_min:
            what = f"greater than {low:g}"
        else:
            what = f"at least {low:g}"
        raise InvalidConfig(f"{key} must be {what}, got {value}", key=key)
    if spec.maximum is not None and value > spec.maximum:
        raise InvalidConfig(f"{key} must be at most {spec.maximum:g}, got {value}", key=key)


def _as_int(raw: Any) -> int:
    if isinstance(raw, bool):
        raise TypeError("bool is not an int")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str):
        text = raw.strip()
        try:
            return int(text)
        except ValueError:
            as_float = float(text)  # "1e15" is an integer in FedScale's defaults
            if as_float.is_integer():
                return int(as_float)
            raise
    raise TypeError(type(raw).__name__)


def _as_float(raw: Any) -> float:
    if isinstance(raw, bool):
        raise TypeError("bool is not a number")
    if isinstance(raw, int | float):
        return float(raw)
    if isinstance(raw, str):
        return float(raw.strip())
    raise TypeError(type(raw).__name__)


def _as_bool(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
        return raw.strip().lower() in ("true", "yes", "1")
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    raise TypeError(type(raw).__name__)


def _as_str(raw: Any) -> str:
    if isinstance(raw, str | int | float) and not isinstance(raw, bool):
        return str(raw)
    raise TypeError(type(raw).__name__)


def _as_shape(raw: Any) -> tuple[int, ...]:
    if isinstance(raw, int) and not isinstance(raw, bool):
        parts: list[Any] = [raw]
    elif isinstance(raw, str):
        parts = raw.replace(",", " ").replace("(", " ").replace(")", " ").replace("[", " ").replace("]", " ").split()
    elif isinstance(raw, list | tuple):
        parts = list(raw)
    else:
        raise TypeError(type(raw).__name__)
    if len(parts) > 4:
        raise ValueError("bad shape")
    dims = tuple(_as_int(p) for p in parts)
    if not dims or any(d <= 0 or d > MAX_INPUT_DIM for d in dims):
        raise ValueError("bad shape")
    return dims


def _job_conf_items(doc: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``job_conf`` as (key, value) pairs, from a list of single-key maps or a plain map."""
    conf = doc.get("job_conf")
    if conf is None:
        raise InvalidConfig("the job file has no job_conf section")
    if isinstance(conf, Mapping):
        return [(str(k), v) for k, v in conf.items()]
    if not isinstance(conf, list):
        raise InvalidConfig(f"job_conf must be a list of single-key maps or a map, got {type(conf).__name__}")
    items: list[tuple[str, Any]] = []
    for index, entry in enumerate(conf, start=1):
        if not isinstance(entry, Mapping) or len(entry) != 1:
            raise InvalidConfig(f"job_conf entry {index} must be a single-key map like '- rounds: 20', got "
                                f"{_describe(entry)}")
        ((key, value),) = entry.items()
        items.append((str(key), value))
    return items


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents with more than MAX_YAML_ALIASES alias references."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise InvalidConfig(f"the job file uses more than {MAX_YAML_ALIASES} YAML aliases (*name)")
        return super().compose_node(parent, index)


def parse_job_text(text: str) -> JobConfig:
    """Parse and validate a FedScale job file's text. Raises :class:`InvalidConfig`."""
    if len(text) > MAX_JOB_FILE_BYTES:
        raise InvalidConfig(f"the job file is {len(text)} characters; the limit is {MAX_JOB_FILE_BYTES}")
    try:
        doc = yaml.load(text, Loader=_BoundedLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InvalidConfig(f"malformed YAML{where}: {problem}") from exc
    if not isinstance(doc, Mapping):
        raise InvalidConfig("a job file must be a YAML mapping with a job_conf section")
    parse = _Parse()
    mode = "sync"
    for key in doc:
        if key == "job_conf":
            continue
        if key not in CLUSTER_KEYS:
            hint = nearest_key(str(key), [*CLUSTER_KEYS, "job_conf"])
            suffix = f" (did you mean {hint}?)" if hint else ""
            raise InvalidConfig(f"unknown top-level key {key!r}{suffix}", key=str(key))
        parse.ignored.append(str(key))
    entry = doc.get("aggregator_entry")
    if isinstance(entry, str) and "async" in entry.rsplit("/", 1)[-1]:
        mode = "async"
    seen: set[str] = set()
    for key, raw in _job_conf_items(doc):
        spec = JOB_KEYS.get(key)
        if spec is None:
            hint = nearest_key(key)
            suffix = f" (did you mean {hint}?)" if hint else ""
            raise InvalidConfig(f"unknown job_conf key {key!r}{suffix}", key=key)
        if key in seen:
            raise InvalidConfig(f"job_conf key {key!r} is given twice", key=key)
        seen.add(key)
        if spec.used:
            parse.values[key] = _convert(key, spec, raw)
        else:
            # Ignored keys take any scalar (FedScale's files write `use_cuda: True` as well as "True").
            if raw is not None and not isinstance(raw, str | int | float | bool):
                raise InvalidConfig(f"{key} must be a single value, got {_describe(raw)}", key=key)
            parse.values[key] = raw if raw is not None else spec.default
            parse.ignored.append(key)
    values = {key: spec.default for key, spec in JOB_KEYS.items()}
    values.update(parse.values)
    data_set = str(values["data_set"])
    if "num_classes" not in parse.values and "data_set" in parse.values and data_set in DATASET_CLASSES:
        values["num_classes"] = DATASET_CLASSES[data_set]  # as FedScale's config_parser does
    if values["save_checkpoint"]:
        values["model_retention"] = 0
    shape = tuple(values["input_shape"])
    if len(shape) == 4:
        # FedScale's 4-D form is (batch, channels, height, width), e.g. its default `1 3 28 28`.
        values["input_shape"] = (shape[2], shape[3], shape[1])
    _check_cross_fields(values, mode)
    if not values["enrollment_token"]:
        # Hex, so that a generated token never starts with "-" (a command line would take it for an option).
        values["enrollment_token"] = secrets.token_hex(20)
    return JobConfig(name=values["job_name"], values=values, mode=mode, ignored=tuple(parse.ignored),
                     source_text=text)


def _check_cross_fields(values: dict[str, Any], mode: str = "sync") -> None:
    name = values["job_name"]
    if not JOB_NAME_RE.match(name):
        raise InvalidConfig(
            f"job_name must be 1-64 letters, digits, '.', '_' or '-' starting with a letter or digit, got {name!r}",
            key="job_name")
    if values["filter_more"] < values["filter_less"]:
        raise InvalidConfig(
            f"filter_more ({values['filter_more']}) must not be below filter_less ({values['filter_less']})",
            key="filter_more")
    if values["retry_max"] < values["retry_min"]:
        raise InvalidConfig(f"retry_max ({values['retry_max']}) must not be below retry_min ({values['retry_min']})",
                            key="retry_max")
    if values["min_learning_rate"] > values["learning_rate"]:
        raise InvalidConfig(
            f"min_learning_rate ({values['min_learning_rate']}) must not exceed learning_rate "
            f"({values['learning_rate']})", key="min_learning_rate")
    if values["aggregator"] == "krum":
        target = values["num_participants"]
        quorum = min(values["min_participants"], target) if values["min_participants"] > 0 else max(1, -(-target // 2))
        if quorum < values["krum_f"] + 3:
            raise InvalidConfig(f"krum with krum_f {values['krum_f']} needs at least {values['krum_f'] + 3} updates "
                                f"per round; raise min_participants (now {quorum})", key="krum_f")
    if values["experiment_mode"] == "simulation":
        raise InvalidConfig("experiment_mode simulation needs FedScale's simulator; this daemon trains on devices "
                            "(use mobile or deployment)", key="experiment_mode")
    strategy = STRATEGIES[canonical(str(values["gradient_policy"]))]
    if mode == "async":
        _check_async(values, strategy.mean_based)
    if not strategy.mean_based and values["aggregator"] != "fedavg":
        raise InvalidConfig(f"gradient_policy {values['gradient_policy']} combines the updates itself; it cannot run "
                            f"with aggregator {values['aggregator']} (use aggregator fedavg)", key="aggregator")
    if values["noise_multiplier"] > 0:
        if values["clip_norm"] <= 0:
            raise InvalidConfig("noise_multiplier needs clip_norm > 0: the noise is calibrated to the clip norm",
                                key="noise_multiplier")
        if values["weighting"] != "uniform":
            raise InvalidConfig("noise_multiplier needs weighting: uniform, so that one device's share of the mean "
                                "(and so the noise it calls for) is bounded whatever the devices claim",
                                key="weighting")
        if values["aggregator"] != "fedavg" or not strategy.mean_based:
            raise InvalidConfig(f"differential privacy (noise_multiplier) is calibrated for a weighted mean of the "
                                f"updates; aggregator {values['aggregator']} with gradient_policy "
                                f"{values['gradient_policy']} is not one", key="noise_multiplier")


def _check_async(values: dict[str, Any], mean_based: bool) -> None:
    """What asynchronous (FedBuff) jobs cannot combine with."""
    if values["aggregator"] != "fedavg" or not mean_based:
        raise InvalidConfig(f"asynchronous mode buffers a weighted mean of deltas; it cannot run aggregator "
                            f"{values['aggregator']} with gradient_policy {values['gradient_policy']}",
                            key="aggregator" if values["aggregator"] != "fedavg" else "gradient_policy")
    if values["clip_norm"] > 0 or values["noise_multiplier"] > 0:
        raise InvalidConfig("clip_norm and noise_multiplier are for synchronous rounds; remove them or the "
                            "asynchronous aggregator_entry", key="clip_norm")
