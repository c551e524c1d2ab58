"""Writes to a chat only by the user who owns it, checked in the data layer itself.

Chainlit's routes check the thread's author before reading, renaming or deleting a thread, but
not before its writes by id: a feedback (PUT/DELETE /feedback), a custom element
(PUT/DELETE /project/element) or a socket message whose id is another user's message (an upsert
that moved her message into his thread). `OwnerChecks` sits in front of those writes of the
SQLAlchemy data layer and raises `NotThreadOwner` when the user acting now does not own the
thread the row belongs to, or when a write would move a row to another thread.

Who is acting: the user Chainlit authenticated for the current HTTP request (recorded by
`record_acting_user`, see app/serving/chainlit_patches.py), else the user of the current
websocket session. With neither (the server's own bookkeeping), nothing is checked.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

if TYPE_CHECKING:
    from chainlit.element import Element
    from chainlit.step import StepDict
    from chainlit.types import Feedback
    from sqlalchemy.ext.asyncio import AsyncEngine

_http_user: ContextVar[str | None] = ContextVar("pagechat_http_user", default=None)


class NotThreadOwner(PermissionError):
    """The acting user does not own the chat this write touches."""


def record_acting_user(identifier: str | None) -> None:
    """The user an HTTP request was authenticated as (for the rest of that request)."""
    _http_user.set(identifier)


def acting_user() -> str | None:
    if (who := _http_user.get()) is not None:
        return who
    from chainlit.context import ChainlitContextException, context

    try:
        user = context.session.user
    except ChainlitContextException:
        return None
    return user.identifier if user is not None else None


class OwnerChecks:
    """Mixin for SQLAlchemyDataLayer: owner checks in front of its writes by id."""

    engine: AsyncEngine

    async def _scalar(self, query: str, **params: Any) -> Any:
        async with self.engine.connect() as conn:
            row = (await conn.execute(text(query), params)).first()
        return row[0] if row else None

    async def thread_owner(self, thread_id: str | None) -> str | None:
        if not thread_id:
            return None
        return await self._scalar(
            'SELECT "userIdentifier" FROM threads WHERE "id" = :id', id=thread_id
        )

    async def step_thread(self, step_id: str) -> str | None:
        """The thread a message/step is stored in (None for an unknown id)."""
        value = await self._scalar('SELECT "threadId" FROM steps WHERE "id" = :id', id=step_id)
        return str(value) if value is not None else None

    async def _element_thread(self, element_id: str) -> str | None:
        value = await self._scalar(
            'SELECT "threadId" FROM elements WHERE "id" = :id', id=element_id
        )
        return str(value) if value is not None else None

    async def _feedback_thread(self, feedback_id: str) -> str | None:
        value = await self._scalar(
            'SELECT "threadId" FROM feedbacks WHERE "id" = :id', id=feedback_id
        )
        return str(value) if value is not None else None

    async def require_owner(self, thread_id: str | None) -> None:
        """NotThreadOwner unless the acting user owns `thread_id` (or no one does yet)."""
        who = acting_user()
        if who is None or not thread_id:
            return
        owner = await self.thread_owner(thread_id)
        if owner is not None and owner != who:
            raise NotThreadOwner("this chat belongs to another user")

    async def _same_thread(self, existing: str | None, target: str | None, what: str) -> None:
        if existing is not None and target is not None and existing != str(target):
            raise NotThreadOwner(f"this {what} id belongs to another chat")
        await self.require_owner(existing or target)

    # ---- the checked writes -------------------------------------------------------------

    async def create_step(self, step_dict: StepDict) -> None:
        existing = await self.step_thread(step_dict["id"])
        await self._same_thread(existing, step_dict.get("threadId"), "message")
        await super().create_step(step_dict)  # type: ignore[misc]

    async def delete_step(self, step_id: str) -> None:
        await self.require_owner(await self.step_thread(step_id))
        await super().delete_step(step_id)  # type: ignore[misc]

    async def upsert_feedback(self, feedback: Feedback) -> str:
        thread = await self.step_thread(feedback.forId)
        if thread is None:
            raise NotThreadOwner("no such message")
        await self._same_thread(thread, feedback.threadId, "message")
        if feedback.id:
            await self._same_thread(await self._feedback_thread(feedback.id), thread, "feedback")
        result: str = await super().upsert_feedback(feedback)  # type: ignore[misc]
        return result

    async def delete_feedback(self, feedback_id: str) -> bool:
        await self.require_owner(await self._feedback_thread(feedback_id))
        result: bool = await super().delete_feedback(feedback_id)  # type: ignore[misc]
        return result

    async def create_element(self, element: Element) -> None:
        existing = await self._element_thread(element.id)
        await self._same_thread(existing, element.thread_id or None, "element")
        await self.require_owner(element.thread_id or None)
        await super().create_element(element)  # type: ignore[misc]

    async def delete_element(self, element_id: str, thread_id: str | None = None) -> None:
        await self.require_owner(await self._element_thread(element_id))
        await super().delete_element(element_id, thread_id)  # type: ignore[misc]
