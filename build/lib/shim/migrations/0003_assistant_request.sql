-- 0003_assistant_request: numbers answered through Vapi's assistant-request.
ALTER TABLE calls ADD COLUMN assistant_request jsonb;
COMMENT ON COLUMN calls.assistant_request IS 'The number''s server answer to Vapi''s assistant-request for this call ({assistantId | assistant, assistantOverrides}); read by whichever instance receives the media stream.';
