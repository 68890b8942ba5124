"""The bare side of `bench_overhead.py`: plain Celery making the same model call.

A Celery app with the swarm worker's delivery settings (JSON, acks late, prefetch off,
threads pool) and one task that makes one `chat.completions.create` through a pooled
`openai` client with no SDK retries, and returns the text, the usage and when it ran.
Read by `celery -A bare_celery worker`; URLs from BARE_REDIS_URL and BARE_LLM_URL.
"""

from __future__ import annotations

import os
import time
from typing import Any

import openai
from celery import Celery

app = Celery("bare", broker=os.environ["BARE_REDIS_URL"], backend=os.environ["BARE_REDIS_URL"])
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    worker_disable_prefetch=True,
    broker_transport_options={"queue_order_strategy": "sorted", "priority_steps": [0]},
)
llm = openai.OpenAI(base_url=os.environ["BARE_LLM_URL"], api_key="unused", max_retries=0)


@app.task(name="bare.ask")
def ask(prompt: str) -> dict[str, Any]:
    started = time.time()
    reply = llm.chat.completions.create(
        model="fake-gpt", messages=[{"role": "user", "content": prompt}], max_tokens=256
    )
    usage = reply.usage
    return {
        "text": reply.choices[0].message.content,
        "tokens": usage.total_tokens if usage else 0,
        "started": started,
        "finished": time.time(),
    }
