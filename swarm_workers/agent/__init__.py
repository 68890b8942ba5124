"""The agent loop: LLM calls, tool calls, budgets, checkpoints. Plain Python, no Celery.

`loop.run_agent` drives one task; `llm` holds the client, the retrying call and the
error mapping; `budget` the token arithmetic; `checkpoint` the state saved after each
step. Import the module you need: this package imports none of them, so a producer
that reads a context window does not load the `openai` SDK.
"""
