"""`mlx_spec.bench`: plain and speculative decoding on the same model and prompts, in one process.

    mlx_spec.bench --model M [--drafter D [--drafter D2 ...] [--random-drafter]] [--draft-model M2] [--ngram [N]]
                   [--oracle RATE[,RATE...]] [--num-draft-tokens 1,2,3,auto] [--max-tokens N]
                   [--repeats R] [--prompts all|chat|code|summarize|structured|FILE] [--temp T]
                   [--json PATH] [--plot PATH]
    mlx_spec.bench --model M (a proposer, as above) --concurrency 1,2,4,8 [--mlx-lm] [--http C] ...

Method: the costs of this machine are probed first (tuning.probe: plain step, (k+1)-token
verify passes, drafting), then every configuration decodes every prompt once to warm up, then `--repeats`
interleaved passes run every configuration on every prompt, in an order that rotates between passes, each
configuration's run next to a plain run of the same prompt on either side: those two plain runs are its
baseline. (A machine's speed drifts: this project's shared VM flips by ~2.5x within seconds, a laptop
throttles. A baseline taken seconds from the run it is compared with holds; medians of runs minutes apart
do not.) A pass's tok/s is its generated tokens over its decode time summed over the prompts; the
reported plain_tps and spec_tps are those of the pass whose spec/baseline ratio is the median, and
speedup = spec_tps / plain_tps. Per kind of work likewise. One more, instrumented pass
times drafting on its own (a host sync after each `propose`) for draft_share; it is not in the tok/s.

Statistics (DESIGN.md's words): tau = tokens per round with drafts; round_cost = decode time per base pass
/ plain step time (so speedup ~ tau / round_cost); verify_cost[k] = a (k+1)-token base pass / a pipelined
plain step, from the probe; draft_share = drafting time / round time; efficiency = the decode time the
cost model accounts for (Σ over rounds of verify + drafting, plus one plain step per token decoded without
drafts: the probe's ratios, in plain steps, times the plain step of the interleaved plain runs) / the
measured decode time: 1.0 means the engine adds nothing to the base passes and the drafting. With the
oracle proposer (drafting about free) it is speedup / (tau / verify_cost[k]). It is reported per pass too
(median and range): one short run moves it by ±0.15 on a machine whose speed drifts.

    runner.py   configurations, one decode, the interleaved passes
    report.py   aggregation (paired medians, efficiency), the table, the plot
    command.py  the command line

With --concurrency, batching instead (concurrency.py's docstring has the method): C closed-loop clients
through the server's batch scheduler, plain batching vs speculative batching vs one request at a time,
mlx-lm's BatchGenerator beside them (--mlx-lm) and a real server process as a check (--http C).

    clients.py       closed-loop clients: through the scheduler, through mlx-lm; Answer, Load
    http_clients.py  the same through a `mlx_spec.server` process (http.client, streamed)
    concurrency.py   configurations at each C, references, warm-up, interleaved passes
    load_report.py   tok/s, TTFT, ITL, tau, exactness, ratios within a pass; the table
    load_command.py  the --concurrency flags, the peer and server set-up, the JSON

Knows the engine's public surface (Engine, its stats, the Proposer and DraftPolicy contracts) and the
tuning package; it decodes nothing itself.
"""

from .command import build_parser, main
from .report import format_table, summarize
from .runner import Bench, Config, RunResult, baseline_label, decode

__all__ = ["main", "build_parser", "Bench", "Config", "RunResult", "baseline_label", "decode", "format_table",
           "summarize"]
