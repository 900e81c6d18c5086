"""Prometheus metrics under vLLM's names (so existing vLLM dashboards and autoscalers work), plus our own.

Each app gets its own CollectorRegistry, so two routers in one process (tests) do not clash. Latencies are
measured at the router, as a client sees them: TTFT from the HTTP request's arrival to the first token
chunk, ITL between token chunks, TPOT = (E2E − TTFT) / (output tokens − 1), queue time as the instance
reports it. The running/waiting/KV gauges are set at scrape time from the cluster's status in Redis.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# vLLM's buckets (vllm/v1/metrics/loggers.py); ITL/TPOT get three finer ones in front, as CPU steps take ms.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)  # fmt: skip
SUBMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

MODEL = ("model_name",)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token.",
            MODEL,
            registry=r,
            buckets=TTFT_BUCKETS,
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds",
            "Time between token chunks.",
            MODEL,
            registry=r,
            buckets=TOKEN_BUCKETS,
        )
        self.tpot = Histogram(
            "vllm:request_time_per_output_token_seconds",
            "Per request: (E2E - TTFT) / (output tokens - 1).",
            MODEL,
            registry=r,
            buckets=TOKEN_BUCKETS,
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency.",
            MODEL,
            registry=r,
            buckets=REQUEST_BUCKETS,
        )
        self.queue_time = Histogram(
            "vllm:request_queue_time_seconds",
            "Time a request waited on its instance before first being scheduled.",
            MODEL,
            registry=r,
            buckets=REQUEST_BUCKETS,
        )
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prompt tokens of finished requests.", MODEL, registry=r
        )
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", MODEL, registry=r)
        self.request_success = Counter(
            "vllm:request_success",
            "Finished requests by finish reason.",
            (*MODEL, "finished_reason"),
            registry=r,
        )
        self.running = Gauge("vllm:num_requests_running", "Requests being generated.", MODEL, registry=r)
        self.waiting = Gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", MODEL, registry=r
        )
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage (1 = full).", MODEL, registry=r)

        self.in_flight = Gauge(
            "ecoserve_router_requests_in_flight",
            "HTTP generation requests open at this router.",
            MODEL,
            registry=r,
        )
        self.http_errors = Counter(
            "ecoserve_router_http_errors", "HTTP error responses by status.", ("status",), registry=r
        )
        self.submit_latency = Histogram(
            "ecoserve_router_submit_latency_seconds",
            "SubmitRequest round trip to the coordinator.",
            registry=r,
            buckets=SUBMIT_BUCKETS,
        )
        self.aborts = Counter(
            "ecoserve_router_aborts", "AbortRequests sent to instances, by reason.", ("reason",), registry=r
        )
        self.stream_failures = Counter(
            "ecoserve_router_stream_failures",
            "Requests ended by an error after submission (instance lost, lost chunks, engine error).",
            ("kind",),
            registry=r,
        )
        self.ready_instances = Gauge(
            "ecoserve_router_ready_instances", "Instances with a live lease in state ready.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
