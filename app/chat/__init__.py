"""The browser chat: Chainlit's callbacks, one `ChatSession` per chat, its settings panel and
texts, streaming to the page, and the chat history the engine is given (token ids in-process,
messages for a remote engine)."""
