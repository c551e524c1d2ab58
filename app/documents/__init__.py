"""Uploaded documents: the upload size guard, text extraction (PDF, DOCX, HTML, text, CSV) and
the passages chosen for a question when a document does not fit the context."""
