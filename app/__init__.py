"""pagechat's web application, grouped by what a user reaches.

- `app.chat`: the browser chat (Chainlit handlers, one session per chat, its settings panel,
  texts, streaming, and the chat histories the engine sees).
- `app.api`: the OpenAI-compatible API under /v1 (routes, request/response models, API keys).
- `app.documents`: uploaded documents (upload limits, text extraction, passage retrieval).
- `app.storage`: chats and files on disk (Chainlit's data layer, our token histories, files).
- `app.serving`: the process itself (the FastAPI server, the runtime that holds the engine,
  the remote-engine client, logins, CORS, Prometheus metrics).

`app.settings` holds the PAGECHAT_* server settings every part reads. engine/ never imports app/.
"""
