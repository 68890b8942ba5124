"""The agent loop: LLM calls, tool calls, budgets. Plain Python, no Celery."""
