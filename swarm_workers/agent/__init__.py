"""The agent loop: LLM calls, tool calls, budgets. Plain Python, no Celery.

`loop.run_agent` drives one task; `llm` holds the client, the retrying call and the
error mapping; `budget` the token arithmetic. Nothing here imports Celery or Redis.
"""

from swarm_workers.agent.budget import OutputBudget, TokenCounter, token_counter
from swarm_workers.agent.llm import RetryPolicy, build_llm_client, complete
from swarm_workers.agent.loop import AgentOutcome, AgentRuntime, run_agent

__all__ = [
    "AgentOutcome",
    "AgentRuntime",
    "OutputBudget",
    "RetryPolicy",
    "TokenCounter",
    "build_llm_client",
    "complete",
    "run_agent",
    "token_counter",
]
