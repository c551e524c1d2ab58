"""The Chainlit callbacks (loaded by mount_chainlit). Each forwards to app.chat.session.

Auth: with PAGECHAT_AUTH_USERS set, a login form checks those users; otherwise one local user
is logged in through a header-auth callback (no form), which is what Chainlit needs to show
the chat history sidebar.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import chainlit as cl
from chainlit.chat_context import chat_contexts
from chainlit.types import ThreadDict

from app.chat import session as chat_session
from app.serving.auth import LOCAL_USER, PasswordUsers, parse_users
from app.serving.runtime import get_runtime

if TYPE_CHECKING:
    from starlette.datastructures import Headers

    from app.storage.data_layer import PagechatDataLayer

_runtime = get_runtime()
_users = PasswordUsers(parse_users(_runtime.settings.auth_users))


@cl.data_layer  # type: ignore[arg-type]  # typed as never None; Chainlit runs without a layer on None
def _data_layer() -> PagechatDataLayer | None:
    return get_runtime().data_layer


if len(_users):

    @cl.password_auth_callback
    async def _password_login(username: str, password: str) -> cl.User | None:
        if _users.check(username, password):
            return cl.User(identifier=username, metadata={"provider": "password"})
        return None

else:

    @cl.header_auth_callback
    async def _local_login(headers: Headers) -> cl.User | None:
        return cl.User(identifier=LOCAL_USER, metadata={"provider": "local"})


@cl.on_chat_start
async def _on_chat_start() -> None:
    await chat_session.new_session().start()


@cl.on_chat_resume
async def _on_chat_resume(thread: ThreadDict) -> None:
    await chat_session.new_session().resume(thread)


@cl.on_message
async def _on_message(message: cl.Message) -> None:
    await chat_session.current().answer(message)


@cl.on_settings_update
async def _on_settings_update(settings: dict[str, Any]) -> None:
    chat_session.current().update_options(settings)


@cl.on_stop
async def _on_stop() -> None:
    await chat_session.current().abort()


@cl.on_chat_end
async def _on_chat_end() -> None:
    # Closing the tab or starting a new chat: nothing cancels the handler, so stop the engine.
    session = cl.user_session.get(chat_session.SESSION_KEY)
    if isinstance(session, chat_session.ChatSession):
        await session.abort()
    # Chainlit keeps every message of every session in `chat_contexts` for the life of the
    # process (pasted documents included); the app keeps its own history, so drop that copy.
    chat_contexts.pop(cl.context.session.id, None)
