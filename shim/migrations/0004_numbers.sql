-- 0004_numbers: moving Twilio numbers from Vapi to the shim (`shim numbers migrate / split /
-- rollback / history`), and the calls a split sends back to Vapi.
-- Objects go to the connection's default schema (search_path), like 0001.

ALTER TABLE numbers
    ADD COLUMN split_percent integer NOT NULL DEFAULT 100 CHECK (split_percent BETWEEN 0 AND 100),
    ADD COLUMN previous_settings jsonb,
    ADD COLUMN twilio_sid text,
    ADD COLUMN migrated_at timestamptz;

COMMENT ON COLUMN numbers.split_percent IS 'Share of callers (0-100) the shim answers; the others are sent with <Redirect> to previous_settings.VoiceUrl (Vapi). Sticky per caller: a hash of the caller and the number picks the side.';
COMMENT ON COLUMN numbers.previous_settings IS 'The number''s Twilio voice settings recorded by `shim numbers migrate` before it changed them, as Twilio names them: {"VoiceUrl", "VoiceMethod", "VoiceFallbackUrl", "VoiceFallbackMethod", "StatusCallback", "StatusCallbackMethod"}; what `shim numbers rollback` restores. Null when the number is not migrated.';
COMMENT ON COLUMN numbers.twilio_sid IS 'Twilio IncomingPhoneNumber SID (PN...) of the number, once migrated.';
COMMENT ON COLUMN numbers.migrated_at IS 'When `shim numbers migrate` last pointed the number''s Voice URL at this deployment; null when not migrated (never, or rolled back).';

-- The voice webhook's routing table is a copy of this table in each instance's memory: tell
-- them at once when it changes (they also re-read it every few seconds).
CREATE FUNCTION shim_numbers_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('shim_numbers', '');
    RETURN NULL;
END $$;
COMMENT ON FUNCTION shim_numbers_changed() IS 'NOTIFY shim_numbers after any change to the numbers table (instances refresh their routing table).';

CREATE TRIGGER numbers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON numbers
    FOR EACH STATEMENT EXECUTE FUNCTION shim_numbers_changed();

CREATE TABLE number_changes (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    number  text NOT NULL,
    action  text NOT NULL CHECK (action IN ('set', 'migrate', 'split', 'rollback')),
    before  jsonb,
    after   jsonb,
    actor   text NOT NULL,
    at      timestamptz NOT NULL DEFAULT now(),
    outcome text NOT NULL DEFAULT 'ok' CHECK (outcome IN ('pending', 'ok', 'failed')),
    error   text
);

COMMENT ON TABLE number_changes IS 'Audit trail of every change `shim numbers` made to a number (Twilio settings, assistant, split), append-only apart from its outcome.';
COMMENT ON COLUMN number_changes.id IS 'Change number, in the order changes were started.';
COMMENT ON COLUMN number_changes.number IS 'The phone number (E.164) changed.';
COMMENT ON COLUMN number_changes.action IS 'What was done: ''set'' (local routing), ''migrate'' (to the shim), ''split'' (share of callers on the shim), ''rollback'' (back to the recorded settings).';
COMMENT ON COLUMN number_changes.before IS 'The state before the change: Twilio voice settings (Twilio''s names), assistant_id, split_percent, as applicable.';
COMMENT ON COLUMN number_changes.after IS 'The state the change set (or tried to set), in the same shape as before.';
COMMENT ON COLUMN number_changes.actor IS 'Who made the change: --actor, else the OS user running the command.';
COMMENT ON COLUMN number_changes.at IS 'When the change was started.';
COMMENT ON COLUMN number_changes.outcome IS '''ok'' (done), ''failed'' (Twilio refused it: nothing changed there), ''pending'' (started, never confirmed: the Twilio update may or may not have been applied; check `shim numbers list`).';
COMMENT ON COLUMN number_changes.error IS 'What went wrong, when outcome is not ''ok''.';

CREATE INDEX number_changes_number_at_idx ON number_changes (number, at);

-- A split sends some callers back to Vapi: their rows say so.
ALTER TABLE calls DROP CONSTRAINT calls_stack_check;
ALTER TABLE calls ADD CONSTRAINT calls_stack_check CHECK (stack IN ('shim', 'vapi', 'vapi-redirect'));
COMMENT ON COLUMN calls.stack IS 'Which stack handled the call: ''shim'' (this service), ''vapi'' (forwarded to Vapi), or ''vapi-redirect'' (a split number''s caller sent back to Vapi with <Redirect>; the shim saw only the ring and the status callbacks).';
