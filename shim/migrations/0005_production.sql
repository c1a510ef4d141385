-- 0005: a truthful schema. Column comments say exactly what the shim writes; tool calls keep
-- the HTTP status of the tool server's answer; the per-call stream token is no longer stored
-- (and is removed from rows written before this migration).

ALTER TABLE tool_calls ADD COLUMN http_status integer;
COMMENT ON COLUMN tool_calls.http_status IS 'HTTP status of the tool server''s answer (null when no HTTP answer came: a timeout, a connection error, a built-in tool such as endCall or transferCall).';

COMMENT ON COLUMN tool_calls.status IS 'requested (the model asked; no result yet), ok (a result went back to the model), error (the tool failed, answered an error, or the arguments were not a JSON object), timeout (no answer within the tool''s timeout), async (an async tool: the model was told the request was accepted; the server''s answer is not awaited).';
COMMENT ON COLUMN tool_calls.result IS 'The tool''s result as given to the model (the endpoint''s result, or the error text the model was told).';
COMMENT ON COLUMN tool_calls.error IS 'What went wrong, when status is error or timeout.';
COMMENT ON COLUMN tool_calls.url IS 'Server URL the tool call was sent to (credentials removed); null for built-in tools.';

COMMENT ON COLUMN call_events.kind IS 'What happened: aborted (the shim ended the call: shutdown, internal error; detail.reason), assistant_unusable, background_sound_unavailable, barge_in, dtmf (a caller keypress), dtmf_sent (keys the assistant pressed), interruption_ignored, model_connect_failed, model_error, model_socket_closed, recording_failed, recording_skipped, recording_started, response_create_unanswered, response_failed, session_format_mismatch, setup_timed_out. Details in detail.';

COMMENT ON COLUMN utterances.ended_at IS 'When the words stopped being heard: for the caller, the end of speech the model detected; for the assistant, started_at plus the audio Twilio confirmed played (heard_ms), so an interrupted turn ends where it was cut.';
COMMENT ON COLUMN calls.custom_parameters IS 'The <Stream> <Parameter> values the media stream started with (assistant, from, to), as a JSON object. The per-call stream token is never stored.';
COMMENT ON COLUMN calls.status IS 'Latest known call status: ringing (voice webhook answered), forwarding (sent on to a transfer destination by assistant-request), in-progress (media stream started), ended (the stream ended), or Twilio''s final status from the status callback (completed, busy, no-answer, failed, canceled).';

UPDATE calls SET custom_parameters = custom_parameters - 'token' WHERE custom_parameters ? 'token';
