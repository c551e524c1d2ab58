"""The process: the FastAPI server with Chainlit mounted, the runtime that holds the one engine
client (in-process or remote), logins, CORS, and the Prometheus metrics."""
