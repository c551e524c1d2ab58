"""The browser chat: Chainlit's callbacks, one `ChatSession` per chat, its settings panel and
texts, streaming to the page, the reading step, and the chat history the engine is given: one
`ChatHistory` interface (app.chat.history), token ids in-process or messages for a remote
engine, chosen once from whether the engine has a tokenizer."""
