"""shim: run exported Vapi assistants on Twilio Media Streams + OpenAI Realtime, recorded in Postgres."""

__version__ = "0.1.0"
