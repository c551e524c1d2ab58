"""Chats on disk: Chainlit's SQLAlchemy data layer with our schema and chat histories (token ids
or messages), and the uploaded files kept beside the database."""
