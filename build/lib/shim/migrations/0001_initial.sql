-- 0001_initial: the call record that users query in SQL.
--
-- Rows are written by shim's batching writer (shim/store.py), which may deliver rows of different
-- tables in any order (and replays them after a database outage), so there are deliberately no
-- foreign keys between these tables: every child table is indexed on call_sid instead.
-- No schema prefix: objects are created in the connection's default schema (search_path).

CREATE TABLE calls (
    call_sid          text PRIMARY KEY,
    stream_sid        text,
    account_sid       text,
    assistant_id      text,
    assistant_name    text,
    from_number       text,
    to_number         text,
    stack             text NOT NULL DEFAULT 'shim' CHECK (stack IN ('shim', 'vapi')),
    model             text,
    voice             text,
    status            text,
    started_at        timestamptz,
    ended_at          timestamptz,
    ended_reason      text,
    next_action       jsonb,
    custom_parameters jsonb,
    metadata          jsonb,
    recording_url     text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE calls IS 'One row per phone call (Twilio CallSid), created when the call arrives and updated as it progresses.';
COMMENT ON COLUMN calls.call_sid IS 'Twilio CallSid (CA...): the call''s identity, and the key every other table joins on.';
COMMENT ON COLUMN calls.stream_sid IS 'Twilio Media Streams StreamSid (MZ...) of the audio stream bridged to the model.';
COMMENT ON COLUMN calls.account_sid IS 'Twilio AccountSid (AC...) that owns the call.';
COMMENT ON COLUMN calls.assistant_id IS 'Id of the assistant (exported Vapi assistant configuration) that answered the call.';
COMMENT ON COLUMN calls.assistant_name IS 'Human-readable name of that assistant at the time of the call.';
COMMENT ON COLUMN calls.from_number IS 'Caller number (E.164), as reported by Twilio.';
COMMENT ON COLUMN calls.to_number IS 'Called number (E.164), as reported by Twilio.';
COMMENT ON COLUMN calls.stack IS 'Which stack handled the call: ''shim'' (this service) or ''vapi'' (forwarded to Vapi).';
COMMENT ON COLUMN calls.model IS 'Realtime model used for the call, e.g. gpt-realtime.';
COMMENT ON COLUMN calls.voice IS 'Model voice used for the call.';
COMMENT ON COLUMN calls.status IS 'Latest known call status (e.g. ringing, in-progress, completed).';
COMMENT ON COLUMN calls.started_at IS 'When the call was answered / the media stream started.';
COMMENT ON COLUMN calls.ended_at IS 'When the call or its media stream ended.';
COMMENT ON COLUMN calls.ended_reason IS 'Why the call ended (e.g. caller hung up, assistant ended the call, transfer, error).';
COMMENT ON COLUMN calls.next_action IS 'What /twilio/stream-ended answers once the media stream ends, decided during the call and read by any instance: e.g. {"verb":"hangup"} or {"verb":"dial", ...}.';
COMMENT ON COLUMN calls.custom_parameters IS 'Custom parameters passed on the Twilio <Stream> (<Parameter> elements), as a JSON object.';
COMMENT ON COLUMN calls.metadata IS 'Free-form JSON metadata about the call (assistant metadata, variables, ...).';
COMMENT ON COLUMN calls.recording_url IS 'URL of the call recording, when one was made.';
COMMENT ON COLUMN calls.created_at IS 'When this row was first written to the database.';
COMMENT ON COLUMN calls.updated_at IS 'When this row was last written to the database.';

CREATE INDEX calls_started_at_idx ON calls (started_at);
CREATE INDEX calls_assistant_id_idx ON calls (assistant_id);

CREATE TABLE utterances (
    call_sid    text NOT NULL,
    seq         integer NOT NULL,
    role        text NOT NULL CHECK (role IN ('user', 'assistant')),
    text        text,
    full_text   text,
    item_id     text,
    started_at  timestamptz,
    ended_at    timestamptz,
    interrupted boolean NOT NULL DEFAULT false,
    audio_ms    integer,
    heard_ms    integer,
    latency_ms  integer,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (call_sid, seq)
);

COMMENT ON TABLE utterances IS 'One row per spoken turn (caller or assistant) of a call. Order a conversation by started_at, then seq (see the transcripts view).';
COMMENT ON COLUMN utterances.call_sid IS 'The call (calls.call_sid) this turn belongs to.';
COMMENT ON COLUMN utterances.seq IS 'Turn number within the call, assigned by shim in the order turns were created (not necessarily spoken).';
COMMENT ON COLUMN utterances.role IS 'Who spoke: ''user'' (the caller) or ''assistant'' (the model).';
COMMENT ON COLUMN utterances.text IS 'What was said: the caller''s transcript, or the assistant text actually spoken (cut where it was interrupted).';
COMMENT ON COLUMN utterances.full_text IS 'The model''s whole generated text for the turn, kept when the turn was interrupted (text then holds the part spoken).';
COMMENT ON COLUMN utterances.item_id IS 'Realtime API conversation item id of this turn.';
COMMENT ON COLUMN utterances.started_at IS 'When the words began to be spoken: the ordering key of a conversation.';
COMMENT ON COLUMN utterances.ended_at IS 'When the words stopped being spoken.';
COMMENT ON COLUMN utterances.interrupted IS 'True when the caller barged in and cut this assistant turn short.';
COMMENT ON COLUMN utterances.audio_ms IS 'Assistant turns: milliseconds of audio sent to Twilio.';
COMMENT ON COLUMN utterances.heard_ms IS 'Assistant turns: milliseconds of audio confirmed played to the caller (Twilio marks).';
COMMENT ON COLUMN utterances.latency_ms IS 'Assistant turns: milliseconds from the caller''s end of speech to the first audio byte sent to Twilio.';
COMMENT ON COLUMN utterances.created_at IS 'When this row was first written to the database.';
COMMENT ON COLUMN utterances.updated_at IS 'When this row was last written to the database.';

CREATE INDEX utterances_call_sid_started_at_idx ON utterances (call_sid, started_at);

CREATE TABLE tool_calls (
    call_sid     text NOT NULL,
    seq          integer NOT NULL,
    call_id      text,
    name         text,
    arguments    jsonb,
    url          text,
    status       text,
    result       text,
    error        text,
    latency_ms   integer,
    requested_at timestamptz,
    completed_at timestamptz,
    PRIMARY KEY (call_sid, seq)
);

COMMENT ON TABLE tool_calls IS 'One row per tool (function) call the model made during a call.';
COMMENT ON COLUMN tool_calls.call_sid IS 'The call (calls.call_sid) during which the tool was called.';
COMMENT ON COLUMN tool_calls.seq IS 'Tool call number within the call, in the order they were requested.';
COMMENT ON COLUMN tool_calls.call_id IS 'Realtime API function call id (call_...).';
COMMENT ON COLUMN tool_calls.name IS 'Tool (function) name.';
COMMENT ON COLUMN tool_calls.arguments IS 'Arguments the model passed, as JSON.';
COMMENT ON COLUMN tool_calls.url IS 'Server URL the tool call was sent to, if any.';
COMMENT ON COLUMN tool_calls.status IS 'Outcome so far, e.g. requested, completed, failed, timeout.';
COMMENT ON COLUMN tool_calls.result IS 'Result text returned to the model.';
COMMENT ON COLUMN tool_calls.error IS 'Error message, when the tool call failed.';
COMMENT ON COLUMN tool_calls.latency_ms IS 'Milliseconds from the request to the result.';
COMMENT ON COLUMN tool_calls.requested_at IS 'When the model requested the tool call.';
COMMENT ON COLUMN tool_calls.completed_at IS 'When the result (or error) came back.';

CREATE TABLE call_events (
    id       uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    call_sid text NOT NULL,
    at       timestamptz NOT NULL,
    kind     text NOT NULL,
    detail   jsonb
);

COMMENT ON TABLE call_events IS 'Event log of a call: model errors, socket losses, barge-ins, transfers... (append-only).';
COMMENT ON COLUMN call_events.id IS 'Event id, generated by shim when the event happened (so replays never duplicate it).';
COMMENT ON COLUMN call_events.call_sid IS 'The call (calls.call_sid) the event belongs to.';
COMMENT ON COLUMN call_events.at IS 'When the event happened.';
COMMENT ON COLUMN call_events.kind IS 'Event kind, e.g. model_error, twilio_socket_lost, barge_in.';
COMMENT ON COLUMN call_events.detail IS 'Event details, as JSON.';

CREATE INDEX call_events_call_sid_at_idx ON call_events (call_sid, at);

CREATE TABLE numbers (
    number       text PRIMARY KEY CHECK (number ~ '^\+[1-9][0-9]{6,14}$'),
    assistant_id text,
    stack        text NOT NULL DEFAULT 'shim' CHECK (stack IN ('shim', 'vapi')),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE numbers IS 'Phone numbers shim answers, and which assistant and stack handle each.';
COMMENT ON COLUMN numbers.number IS 'Phone number in E.164 form (+ then 7 to 15 digits).';
COMMENT ON COLUMN numbers.assistant_id IS 'Assistant that answers calls to this number.';
COMMENT ON COLUMN numbers.stack IS 'Which stack handles calls to this number: ''shim'' or ''vapi''.';
COMMENT ON COLUMN numbers.updated_at IS 'When this row was last written.';

CREATE VIEW transcripts AS
    SELECT call_sid, seq, role, text, started_at, interrupted
    FROM utterances
    ORDER BY call_sid, started_at NULLS LAST, seq;

COMMENT ON VIEW transcripts IS 'Conversation turns in speaking order. When filtering or joining, order explicitly: ORDER BY call_sid, started_at NULLS LAST, seq.';
COMMENT ON COLUMN transcripts.call_sid IS 'The call (calls.call_sid).';
COMMENT ON COLUMN transcripts.seq IS 'Turn number within the call (tie-breaker after started_at).';
COMMENT ON COLUMN transcripts.role IS '''user'' (the caller) or ''assistant'' (the model).';
COMMENT ON COLUMN transcripts.text IS 'What was said (for interrupted assistant turns: the part spoken).';
COMMENT ON COLUMN transcripts.started_at IS 'When the words began to be spoken.';
COMMENT ON COLUMN transcripts.interrupted IS 'True when the caller cut this assistant turn short.';
