"""The server's Prometheus metrics, in a registry of its own (two apps in one process, as in tests, never mix).

Label values come only from fixed sets (endpoints, error kinds) and the model names fixed at startup, so no request
can grow the number of series.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1)
TOKENS_PER_S_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class ServeMetrics:
    """Every metric of one server; `exposition()` is the /metrics body."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("dsft_serve_requests", "Requests answered, by endpoint, model and HTTP status.",
                                ["endpoint", "model", "status"], registry=r)
        self.request_latency = Histogram("dsft_serve_request_latency_seconds",
                                         "Time from a request's arrival to its last byte, by endpoint and model.",
                                         ["endpoint", "model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.time_to_first_token = Histogram("dsft_serve_time_to_first_token_seconds",
                                             "Time from a request's arrival to its first generated token.",
                                             ["model"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.generated_tokens = Counter("dsft_serve_generated_tokens", "Tokens generated (cache hits not counted).",
                                        ["model"], registry=r)
        self.prompt_tokens = Counter("dsft_serve_prompt_tokens", "Prompt tokens of answered requests.", ["model"],
                                     registry=r)
        self.tokens_per_second = Histogram("dsft_serve_tokens_per_second",
                                           "Generated tokens per second of each request, first token to last.",
                                           ["model"], buckets=TOKENS_PER_S_BUCKETS, registry=r)
        self.errors = Counter("dsft_serve_errors", "Requests answered with an error, by kind.", ["kind"], registry=r)
        self.queue_depth = Gauge("dsft_serve_queue_depth", "Requests waiting for a batch.", registry=r)
        self.batch_size = Histogram("dsft_serve_batch_size", "Requests per generation batch.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.batch_limit = Gauge("dsft_serve_batch_limit", "Batch size the latency controller allows now.",
                                 registry=r)
        self.step_latency = Histogram("dsft_serve_step_latency_seconds",
                                      "Wall time of one decoding step of a batch (what the controller holds near "
                                      "target_latency_ms).", buckets=STEP_BUCKETS_S, registry=r)
        self.cache_hits = Counter("dsft_serve_cache_hits", "Greedy requests answered from the response cache.",
                                  registry=r)
        self.cache_misses = Counter("dsft_serve_cache_misses", "Greedy requests the response cache did not hold.",
                                    registry=r)
        self.cache_entries = Gauge("dsft_serve_cache_entries", "Replies held by the response cache.", registry=r)
        self.routed = Counter("dsft_serve_routed_requests", "Requests by the name asked for and the model that served "
                              "them (a canary alias splits between two).", ["requested", "served"], registry=r)
        self._add_release_metrics(r)

    def _add_release_metrics(self, r) -> None:
        """Canary, shadow and feedback."""
        self.canary_percent = Gauge("dsft_serve_canary_percent", "Share of the canary alias's requests sent to the "
                                    "candidate now, percent (0 after a rollback).", ["alias", "candidate"], registry=r)
        self.canary_rollbacks = Counter("dsft_serve_canary_rollbacks", "Canary rollbacks, by the metric that was "
                                        "worse.", ["alias", "candidate", "metric"], registry=r)
        pair = ["primary", "candidate"]
        self.shadow_requests = Counter("dsft_serve_shadow_requests", "Shadowed requests by outcome: compared, error "
                                       "(the candidate failed), skipped (max_in_flight reached).",
                                       [*pair, "outcome"], registry=r)
        self.shadow_exact = Counter("dsft_serve_shadow_exact_matches", "Compared pairs whose answers are equal.",
                                    pair, registry=r)
        self.shadow_f1 = Histogram("dsft_serve_shadow_token_f1", "Token F1 of the candidate's answer against the "
                                   "primary's.", pair, buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0), registry=r)
        self.shadow_length_difference = Histogram(
            "dsft_serve_shadow_length_difference_tokens", "Candidate's completion tokens minus the primary's.", pair,
            buckets=(-256, -64, -16, -4, -1, 0, 1, 4, 16, 64, 256), registry=r)
        self.shadow_latency_difference = Histogram(
            "dsft_serve_shadow_latency_difference_seconds", "Candidate's generation time minus the primary's.", pair,
            buckets=(-10, -1, -0.1, -0.01, 0, 0.01, 0.1, 1, 10), registry=r)
        self.feedback_responses = Gauge("dsft_serve_feedback_responses", "Replies with user feedback, by the model "
                                        "that answered.", ["model"], registry=r)
        self.feedback_mean_score = Gauge("dsft_serve_feedback_mean_score", "Mean user feedback score (0..1; thumbs "
                                         "up 1, down 0), by the model that answered.", ["model"], registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
