"""shim parity: prove the shim against the old Vapi stack (A/B runs, Vapi import, report)."""
