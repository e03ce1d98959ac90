"""``mame-deploy loadtest``: closed-loop load on a Triton server, level by level.

At each concurrency level, that many client threads (one connection each) send requests of
``batch`` images back to back until the level's time or request budget is spent, whichever
comes first; nothing waits longer than the per-request timeout. A level reports requests,
failures (grouped by message), images per second over the level's wall time, p50/p90/p99
latency of the successful requests, and -- read from Triton's statistics before and after --
the mean batch the server's dynamic batcher formed. Models are run level by level in turn
(A@1, B@1, A@8, ...), so drift of a shared machine touches both alike; given a merged and an
unmerged model of the same network, each level compares their throughput.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from mame_deploy.errors import UserError

DEFAULT_LEVELS = (1, 8, 32)
DEFAULT_DURATION_S = 10.0
DEFAULT_MAX_REQUESTS = 10_000
DEFAULT_TIMEOUT_S = 60.0
MAX_CONCURRENCY = 256
CLIENT_HINT = "pip install 'mame-deploy[serve]'"


# ---------------------------------------------------------------------------------------------
# Arguments


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"`concurrency` must be comma-separated integers such as 1,8,32; got {text!r}") from None
    if not levels or min(levels) < 1 or max(levels) > MAX_CONCURRENCY:
        raise UserError(f"`concurrency` levels must be in 1..{MAX_CONCURRENCY}; got {text!r}")
    return sorted(set(levels))


def parse_url(url: str) -> tuple[str, str]:
    """``http://host:port``, ``grpc://host:port`` or ``host:port`` (HTTP) -> (protocol, host:port)."""
    text = url.strip()
    protocol = "http"
    for scheme in ("http", "grpc"):
        if text.startswith(f"{scheme}://"):
            protocol, text = scheme, text[len(scheme) + 3:]
    if text.startswith("https://") or "://" in text:
        raise UserError(f"URL {url!r}: use http://HOST:PORT or grpc://HOST:PORT")
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"URL {url!r} needs a host and a port, e.g. http://127.0.0.1:8000")
    return protocol, text


def check_bounds(duration_s: float, max_requests: int, timeout_s: float, batch: Optional[int]) -> None:
    if not 0 < duration_s <= 3600:
        raise UserError(f"`duration` must be in (0, 3600] seconds, got {duration_s}")
    if not 1 <= max_requests <= 10_000_000:
        raise UserError(f"`requests` must be in 1..10000000, got {max_requests}")
    if not 0 < timeout_s <= 600:
        raise UserError(f"`timeout` must be in (0, 600] seconds, got {timeout_s}")
    if batch is not None and batch < 1:
        raise UserError(f"`batch` must be at least 1, got {batch}")


# ---------------------------------------------------------------------------------------------
# Clients


def _client_module(protocol: str):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
    except ImportError:
        raise UserError(f"loadtest needs tritonclient; {CLIENT_HINT}") from None
    return module


def make_client(protocol: str, address: str, timeout_s: float):
    module = _client_module(protocol)
    if protocol == "grpc":
        return module.InferenceServerClient(address)
    return module.InferenceServerClient(address, connection_timeout=timeout_s, network_timeout=timeout_s)


_WRAPPER = re.compile(r"^(?:[\w.]*(?:Exception|Error)|\[\d+\][^:]*message): ")


def first_line(exc: BaseException) -> str:
    """What went wrong, on one line: Triton's own message, or -- for an exception raised in the
    server's Python backend, which arrives with its traceback -- the exception's last line with
    the wrapper names stripped (``BadRequest: the request has 3 NaN/Inf value(s) ...``)."""
    text = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    lines = [line.strip() for line in (text or str(exc)).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    if "Traceback" in text:
        raised = [x for x in lines if re.match(r"^[\w.]+: ", x) and not x.endswith("Traceback (most recent call last):")]
        line = raised[-1] if raised else line
        while _WRAPPER.match(line):
            line = _WRAPPER.sub("", line, count=1)
        line = re.sub(r"^(?:\w+\.)+(\w+: )", r"\1", line)  # mame_deploy.serve.BadRequest -> BadRequest
    return line[:300]


@dataclass
class ModelInfo:
    name: str
    input_name: str
    datatype: str
    shape: list            # without the batch axis when max_batch > 0
    max_batch: int         # 0: the model takes a fixed shape, no batch axis of its own
    output_name: str
    parameters: dict = field(default_factory=dict)

    @property
    def merged(self) -> Optional[bool]:
        """From the config's mame.* parameters; None when the server does not say."""
        if "mame.ratio" not in self.parameters:
            return None
        spec = self.parameters.get("mame.schedule_spec", "null")
        return float(self.parameters["mame.ratio"]) > 0 or spec not in ("null", "")

    def request_shape(self, batch: Optional[int]) -> list:
        if self.max_batch == 0:
            if batch is not None and batch != self.shape[0]:
                raise UserError(f"{self.name} takes exactly {self.shape} (no batching); drop `batch` or pass "
                                f"`batch` {self.shape[0]}")
            return list(self.shape)
        size = 1 if batch is None else batch
        if size > self.max_batch:
            raise UserError(f"`batch` {size} is over {self.name}'s maximum batch of {self.max_batch}")
        return [size] + list(self.shape)


def model_info(client, protocol: str, name: str) -> ModelInfo:
    """What the server says about ``name``: its input, its maximum batch and its parameters."""
    try:
        if protocol == "grpc":
            meta = client.get_model_metadata(name, as_json=True)
            config = client.get_model_config(name, as_json=True)["config"]
        else:
            meta = client.get_model_metadata(name)
            config = client.get_model_config(name)
    except Exception as exc:
        raise UserError(f"the server has no model {name!r} ready ({first_line(exc)})") from None
    if len(meta.get("inputs", [])) != 1 or not meta.get("outputs"):
        raise UserError(f"{name} has {len(meta.get('inputs', []))} inputs; loadtest drives models with one input")
    inp = meta["inputs"][0]
    max_batch = int(config.get("max_batch_size", config.get("maxBatchSize", 0)) or 0)
    shape = [int(d) for d in inp["shape"]]
    if max_batch:
        shape = shape[1:]
    if any(d < 1 for d in shape):
        raise UserError(f"{name}'s input {inp['name']} has a variable axis besides the batch: {inp['shape']}")
    params = {k: (v.get("string_value", v.get("stringValue", "")) if isinstance(v, dict) else str(v))
              for k, v in (config.get("parameters") or {}).items()}
    return ModelInfo(name, inp["name"], inp["datatype"], shape, max_batch, meta["outputs"][0]["name"], params)


def list_models(client, protocol: str) -> list[str]:
    """The server's models, from its statistics (open where the repository index is restricted,
    as PyTriton restricts it); those not ready are left out."""
    try:
        stats = client.get_inference_statistics("", as_json=True) if protocol == "grpc" \
            else client.get_inference_statistics("")
    except Exception as exc:
        raise UserError(f"could not list the server's models ({first_line(exc)}); name them with `model`") from None
    names = sorted({entry["name"] for entry in stats.get("model_stats", [])})
    ready = [n for n in names if _ready(client, n)]
    if not ready:
        raise UserError("the server has no ready model")
    return ready


def _ready(client, name: str) -> bool:
    try:
        return bool(client.is_model_ready(name))
    except Exception:
        return False


def _field(entry: dict, name: str):
    """A statistics field by its HTTP (snake_case) or gRPC-JSON (camelCase) name."""
    camel = name.split("_")[0] + "".join(w.title() for w in name.split("_")[1:])
    return entry.get(name, entry.get(camel, 0))


def server_counts(client, protocol: str, name: str) -> Optional[dict]:
    """Triton's cumulative statistics of ``name``: images inferred, executions (formed batches),
    and the nanoseconds requests spent queued and batches spent in the model; None if unreadable."""
    try:
        stats = (client.get_inference_statistics(name, as_json=True) if protocol == "grpc"
                 else client.get_inference_statistics(name))
        entry = stats["model_stats"][0]
        queue = _field(_field(entry, "inference_stats"), "queue")
        batches = [_field(b, "compute_infer") for b in (_field(entry, "batch_stats") or [])]
        return {
            "images": int(_field(entry, "inference_count")), "executions": int(_field(entry, "execution_count")),
            "queued": int(_field(queue, "count")), "queue_ns": int(_field(queue, "ns")),
            "batches": sum(int(_field(b, "count")) for b in batches),
            "batch_ns": sum(int(_field(b, "ns")) for b in batches),
        }
    except Exception:
        return None


def server_side(before: Optional[dict], after: Optional[dict]) -> dict:
    """What the server did during a level: the mean batch its dynamic batcher formed, the mean
    time one such batch took in the model (Triton's compute_infer: the served callable, runner
    included), and the mean time a request waited in the queue."""
    if before is None or after is None or after["executions"] <= before["executions"]:
        return {"server_batch": None, "server_executions": None, "server_compute_ms": None, "server_queue_ms": None}
    d = {k: after[k] - before[k] for k in after}
    return {
        "server_batch": d["images"] / d["executions"], "server_executions": d["executions"],
        # per batch size, Triton sums compute_infer once per execution (its per-request stats
        # would count a batch of k requests k times)
        "server_compute_ms": d["batch_ns"] / d["batches"] / 1e6 if d["batches"] > 0 else None,
        "server_queue_ms": d["queue_ns"] / d["queued"] / 1e6 if d["queued"] > 0 else None,
    }


# ---------------------------------------------------------------------------------------------
# One level


class Budget:
    """At most ``total`` requests across all workers (a thread-safe countdown)."""

    def __init__(self, total: int):
        self.left = total
        self.lock = threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


def _worker(make, info: ModelInfo, images: np.ndarray, protocol: str, deadline: float, budget: Budget,
            timeout_s: float, latencies: list, errors: Counter, lock: threading.Lock):
    module = _client_module(protocol)
    try:
        client = make()
    except Exception as exc:
        with lock:
            errors[f"could not connect: {first_line(exc)}"] += 1
        return
    try:
        inp = module.InferInput(info.input_name, list(images.shape), info.datatype)
        inp.set_data_from_numpy(images)
        outputs = [module.InferRequestedOutput(info.output_name)]
        while time.monotonic() < deadline and budget.take():
            start = time.perf_counter()
            try:
                if protocol == "grpc":
                    client.infer(info.name, [inp], outputs=outputs, client_timeout=timeout_s)
                else:
                    client.infer(info.name, [inp], outputs=outputs)
                took = time.perf_counter() - start
                with lock:
                    latencies.append(took)
            except Exception as exc:
                with lock:
                    errors[first_line(exc)] += 1
    finally:
        try:
            client.close()
        except Exception:
            pass


def run_level(protocol: str, address: str, info: ModelInfo, concurrency: int, batch: Optional[int],
              duration_s: float, max_requests: int, timeout_s: float, seed: int = 0) -> dict:
    """Drive ``info`` with ``concurrency`` closed-loop clients; one row of results."""
    shape = info.request_shape(batch)
    images = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    per_request = shape[0] if info.max_batch else 1
    stats_client = make_client(protocol, address, timeout_s)
    try:
        before = server_counts(stats_client, protocol, info.name)
        latencies: list = []
        errors: Counter = Counter()
        lock = threading.Lock()
        budget = Budget(max_requests)
        start = time.monotonic()
        deadline = start + duration_s
        workers = [threading.Thread(
            target=_worker, daemon=True,
            args=(lambda: make_client(protocol, address, timeout_s), info, images, protocol, deadline, budget,
                  timeout_s, latencies, errors, lock))
            for _ in range(concurrency)]
        for w in workers:
            w.start()
        for w in workers:  # a request started before the deadline ends within the timeout
            w.join(timeout=max(0.0, deadline + timeout_s + 5 - time.monotonic()))
        stuck = sum(w.is_alive() for w in workers)
        wall = time.monotonic() - start
        after = server_counts(stats_client, protocol, info.name)
    finally:
        stats_client.close()
    with lock:
        times = np.array(latencies)
        failed = dict(errors)
    if stuck:
        failed[f"{stuck} client(s) still waiting after the timeout"] = stuck
    ok = len(times)
    row = {
        "model": info.name, "concurrency": concurrency, "batch": per_request if info.max_batch else shape[0],
        "requests": ok + sum(errors.values()), "ok": ok, "failed": sum(failed.values()),
        "errors": failed, "wall_s": round(wall, 3),
        "images_per_s": ok * per_request / wall if wall > 0 else 0.0,
        "requests_per_s": ok / wall if wall > 0 else 0.0,
    }
    if ok:
        p50, p90, p99 = np.percentile(times, [50, 90, 99]) * 1e3
        row.update(p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(times.mean() * 1e3))
    else:
        row.update(p50_ms=None, p90_ms=None, p99_ms=None, mean_ms=None)
    row.update(server_side(before, after))
    return row


# ---------------------------------------------------------------------------------------------
# The whole run


def pair_baselines(infos: Sequence[ModelInfo], baseline: Optional[str] = None) -> dict[str, str]:
    """merged model -> its unmerged counterpart among ``infos`` (same network by mame.model,
    same input); ``baseline`` names it explicitly."""
    names = {i.name for i in infos}
    if baseline is not None:
        if baseline not in names:
            raise UserError(f"`baseline` {baseline!r} is not among the models tested ({', '.join(sorted(names))})")
        return {i.name: baseline for i in infos if i.name != baseline}
    pairs = {}
    for info in infos:
        if not info.merged:
            continue
        for other in infos:
            same = (other.parameters.get("mame.model") == info.parameters.get("mame.model")
                    and other.shape == info.shape)
            if other.merged is False and same:
                pairs[info.name] = other.name
                break
    return pairs


def add_comparison(rows: list[dict], pairs: dict[str, str]) -> list[dict]:
    """Per level: throughput of each merged model over its unmerged one, and the p50 ratio."""
    by_key = {(r["model"], r["concurrency"]): r for r in rows}
    out = []
    for merged, base in pairs.items():
        for (model, level), row in sorted(by_key.items(), key=lambda kv: kv[0][1]):
            if model != merged or (base, level) not in by_key:
                continue
            ref = by_key[(base, level)]
            speedup = row["images_per_s"] / ref["images_per_s"] if ref["images_per_s"] else None
            p50 = ref["p50_ms"] / row["p50_ms"] if ref["p50_ms"] and row["p50_ms"] else None
            row["speedup"] = speedup
            out.append({"merged": merged, "unmerged": base, "concurrency": level,
                        "throughput_speedup": speedup, "p50_speedup": p50})
    return out


def loadtest(url: str, models: Sequence[str] = (), levels: Sequence[int] = DEFAULT_LEVELS,
             duration_s: float = DEFAULT_DURATION_S, max_requests: int = DEFAULT_MAX_REQUESTS,
             batch: Optional[int] = None, timeout_s: float = DEFAULT_TIMEOUT_S, warmup: int = 2,
             baseline: Optional[str] = None, seed: int = 0,
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run every level on every model; the report (rows, comparison, settings) as a dict."""
    check_bounds(duration_s, max_requests, timeout_s, batch)
    if not 0 <= warmup <= 1000:
        raise UserError(f"`warmup` must be in 0..1000 requests, got {warmup}")
    protocol, address = parse_url(url)
    client = make_client(protocol, address, timeout_s)
    try:
        try:
            live = client.is_server_live()
        except Exception as exc:
            raise UserError(f"no Triton server answers at {url} ({first_line(exc)}); start one with "
                            "`mame-deploy serve`") from None
        if not live:
            raise UserError(f"the server at {url} is not live")
        names = list(models) or list_models(client, protocol)
        infos = [model_info(client, protocol, n) for n in names]
    finally:
        client.close()
    for info in infos:
        info.request_shape(batch)  # a bad --batch fails before any load
    pairs = pair_baselines(infos, baseline)
    rows = []
    for level in levels:
        for info in infos:
            if warmup:
                run_level(protocol, address, info, 1, batch, duration_s, warmup, timeout_s, seed)
            if progress:
                progress(f"{info.name} at concurrency {level}")
            rows.append(run_level(protocol, address, info, level, batch, duration_s, max_requests, timeout_s, seed))
    comparison = add_comparison(rows, pairs)
    return {
        "url": url, "protocol": protocol, "models": [asdict(i) for i in infos], "levels": list(levels),
        "batch": batch, "duration_s": duration_s, "max_requests": max_requests, "timeout_s": timeout_s,
        "rows": rows, "comparison": comparison, "failed": sum(r["failed"] for r in rows),
    }
