"""Prepare the benchmark database: a tier, a prompt rule and keys; print the keys.

Run with the benchmark's DATABASE_URL in the environment. It empties the usage
records and quota counters left by earlier runs, so use a database that serves
benchmarks only.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proxy_site.settings")

import django  # noqa: E402

django.setup()

from generation.models import QuotaCounter, UsageRecord  # noqa: E402
from keys.models import APIKey, PromptRule, Tier  # noqa: E402
from keys.services import issue_key  # noqa: E402

TIER_NAME = "bench"
# High enough that no benchmark request is refused, low enough that the
# limiter and the quota run their full path on every request.
TIER_LIMITS = {
    "rate_limits": "1000000/m",
    "tokens_per_day": 10**12,
    "tokens_per_month": 10**13,
    "max_tokens_cap": 256,
    "max_prompt_chars": 20_000,
}
RULE_NAME = "bench-block-keyword"


def prepare(key_count: int) -> list[str]:
    """Create or reset the benchmark tier and rule; return `key_count` new keys."""
    UsageRecord.objects.all().delete()
    QuotaCounter.objects.all().delete()
    APIKey.objects.filter(tier__name=TIER_NAME).delete()
    tier, _ = Tier.objects.update_or_create(name=TIER_NAME, defaults=TIER_LIMITS)
    rule, _ = PromptRule.objects.update_or_create(
        name=RULE_NAME,
        defaults={
            "kind": PromptRule.Kind.KEYWORD,
            "pattern": "forbidden-benchmark-word",
            "action": PromptRule.Action.BLOCK,
            "message": "This prompt contains a blocked word.",
        },
    )
    tier.rules.set([rule])
    return [issue_key(name=f"benchmark {n}", tier=tier)[1] for n in range(key_count)]


if __name__ == "__main__":
    print("\n".join(prepare(int(sys.argv[1]) if len(sys.argv) > 1 else 1)))
