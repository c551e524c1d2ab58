"""Chats on disk: Chainlit's SQLAlchemy data layer with our schema and token histories, and the
uploaded files kept beside the database."""
