"""Tool webhooks: forwarding the model's function calls to the customer's existing Vapi tool
URLs in Vapi's own `tool-calls` envelope, and Vapi server messages. Filled in by the tools
issue; kept as its own package (per the design card) so it stays free of socket code."""
