-- 0006_parity: what a call cost, per call in SQL, and the A/B parity runs against Vapi.
--
-- * model_usage: the Realtime model's usage from every response.done, one row per response.
-- * model_prices / minute_prices: the price table (shim/costs.py writes it at start, from its
--   documented defaults and SHIM_PRICES_FILE); costs are computed in SQL from it.
-- * calls.cost_usd / calls.costs (Vapi's costs[] shape): kept up to date by triggers for shim
--   calls as usage rows and the call's end arrive (in any order, as the batching writer
--   delivers them); for imported Vapi calls they are Vapi's own figures.
-- * call_rollup: one row per call with the figures people compare.
-- * parity_runs + parity_report(): scripted A/B runs and the drift / latency / cost report.
--
-- No foreign keys (see 0001): the writer may deliver rows of different tables in any order.

CREATE TABLE model_usage (
    call_sid             text NOT NULL,
    response_id          text NOT NULL,
    at                   timestamptz NOT NULL,
    usage                jsonb NOT NULL,
    input_tokens         integer GENERATED ALWAYS AS ((usage->>'input_tokens')::integer) STORED,
    output_tokens        integer GENERATED ALWAYS AS ((usage->>'output_tokens')::integer) STORED,
    input_text_tokens    integer GENERATED ALWAYS AS (COALESCE((usage->'input_token_details'->>'text_tokens')::integer, 0)) STORED,
    input_audio_tokens   integer GENERATED ALWAYS AS (COALESCE((usage->'input_token_details'->>'audio_tokens')::integer, 0)) STORED,
    input_image_tokens   integer GENERATED ALWAYS AS (COALESCE((usage->'input_token_details'->>'image_tokens')::integer, 0)) STORED,
    cached_tokens        integer GENERATED ALWAYS AS (COALESCE((usage->'input_token_details'->>'cached_tokens')::integer, 0)) STORED,
    cached_text_tokens   integer GENERATED ALWAYS AS (COALESCE((usage->'input_token_details'->'cached_tokens_details'->>'text_tokens')::integer, 0)) STORED,
    cached_audio_tokens  integer GENERATED ALWAYS AS (COALESCE((usage->'input_token_details'->'cached_tokens_details'->>'audio_tokens')::integer, 0)) STORED,
    cached_image_tokens  integer GENERATED ALWAYS AS (COALESCE((usage->'input_token_details'->'cached_tokens_details'->>'image_tokens')::integer, 0)) STORED,
    output_text_tokens   integer GENERATED ALWAYS AS (COALESCE((usage->'output_token_details'->>'text_tokens')::integer, 0)) STORED,
    output_audio_tokens  integer GENERATED ALWAYS AS (COALESCE((usage->'output_token_details'->>'audio_tokens')::integer, 0)) STORED,
    PRIMARY KEY (call_sid, response_id)
);

COMMENT ON TABLE model_usage IS 'Token usage of the Realtime model, one row per response (response.done.response.usage). Cached tokens are a subset of input tokens.';
COMMENT ON COLUMN model_usage.call_sid IS 'The call (calls.call_sid) the response belongs to.';
COMMENT ON COLUMN model_usage.response_id IS 'Realtime response id (resp_...).';
COMMENT ON COLUMN model_usage.at IS 'When response.done arrived.';
COMMENT ON COLUMN model_usage.usage IS 'The usage object exactly as the Realtime API sent it.';
COMMENT ON COLUMN model_usage.input_tokens IS 'All input tokens of the response (text + audio + image, cached included).';
COMMENT ON COLUMN model_usage.output_tokens IS 'All output tokens of the response (text + audio).';
COMMENT ON COLUMN model_usage.input_text_tokens IS 'Input text tokens (cached included).';
COMMENT ON COLUMN model_usage.input_audio_tokens IS 'Input audio tokens (cached included).';
COMMENT ON COLUMN model_usage.input_image_tokens IS 'Input image tokens (cached included).';
COMMENT ON COLUMN model_usage.cached_tokens IS 'Input tokens served from the prompt cache (a subset of input_tokens).';
COMMENT ON COLUMN model_usage.cached_text_tokens IS 'Cached input text tokens (a subset of input_text_tokens).';
COMMENT ON COLUMN model_usage.cached_audio_tokens IS 'Cached input audio tokens (a subset of input_audio_tokens).';
COMMENT ON COLUMN model_usage.cached_image_tokens IS 'Cached input image tokens (a subset of input_image_tokens).';
COMMENT ON COLUMN model_usage.output_text_tokens IS 'Output text tokens (the transcript of what the model said, and function calls).';
COMMENT ON COLUMN model_usage.output_audio_tokens IS 'Output audio tokens (what the model said).';

CREATE TABLE model_prices (
    model              text PRIMARY KEY,
    input_text         numeric NOT NULL,
    cached_input_text  numeric NOT NULL,
    input_audio        numeric NOT NULL,
    cached_input_audio numeric NOT NULL,
    input_image        numeric NOT NULL,
    cached_input_image numeric NOT NULL,
    output_text        numeric NOT NULL,
    output_audio       numeric NOT NULL,
    source             text,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE model_prices IS 'Price table of Realtime models, USD per 1M tokens, written at start by shim/costs.py (defaults, overridden by SHIM_PRICES_FILE). A call''s model matches its exact name or, for a dated snapshot NAME-YYYY-MM-DD, NAME (gpt-realtime-2025-08-28 is priced as gpt-realtime; gpt-realtime-2 is not); any other model has no price.';
COMMENT ON COLUMN model_prices.model IS 'Model name or name prefix, e.g. gpt-realtime-2.1.';
COMMENT ON COLUMN model_prices.input_text IS 'USD per 1M uncached input text tokens.';
COMMENT ON COLUMN model_prices.cached_input_text IS 'USD per 1M cached input text tokens.';
COMMENT ON COLUMN model_prices.input_audio IS 'USD per 1M uncached input audio tokens.';
COMMENT ON COLUMN model_prices.cached_input_audio IS 'USD per 1M cached input audio tokens.';
COMMENT ON COLUMN model_prices.input_image IS 'USD per 1M uncached input image tokens.';
COMMENT ON COLUMN model_prices.cached_input_image IS 'USD per 1M cached input image tokens.';
COMMENT ON COLUMN model_prices.output_text IS 'USD per 1M output text tokens.';
COMMENT ON COLUMN model_prices.output_audio IS 'USD per 1M output audio tokens.';
COMMENT ON COLUMN model_prices.source IS 'Where the figures come from (a public URL, or the override file).';
COMMENT ON COLUMN model_prices.updated_at IS 'When this row was last written.';

CREATE TABLE minute_prices (
    item           text PRIMARY KEY,
    usd_per_minute numeric NOT NULL,
    source         text,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE minute_prices IS 'Per-minute prices (Twilio), written at start by shim/costs.py. Minutes are billed rounded up to whole minutes, as Twilio does.';
COMMENT ON COLUMN minute_prices.item IS 'What is billed per minute: twilio (the inbound call leg).';
COMMENT ON COLUMN minute_prices.usd_per_minute IS 'USD per started minute.';
COMMENT ON COLUMN minute_prices.source IS 'Where the figure comes from (a public URL, or the override file).';
COMMENT ON COLUMN minute_prices.updated_at IS 'When this row was last written.';

ALTER TABLE calls
    ADD COLUMN cost_usd numeric,
    ADD COLUMN costs jsonb,
    ADD COLUMN stereo_recording_url text;

COMMENT ON COLUMN calls.cost_usd IS 'What the call cost, USD. Shim calls: model tokens at model_prices + Twilio minutes at minute_prices (kept current by triggers; null while the model has no price). Vapi calls: Vapi''s call.cost.';
COMMENT ON COLUMN calls.costs IS 'The cost broken down in Vapi''s costs[] shape: [{"type":"transport","provider":"twilio","minutes","cost"}, {"type":"model","model":{"provider","model"},"promptTokens","completionTokens","cachedPromptTokens","cost"}, ...]. Vapi calls: Vapi''s own costs[].';
COMMENT ON COLUMN calls.stereo_recording_url IS 'Stereo recording (customer left, assistant right), when known; Vapi calls: artifact.stereoRecordingUrl.';

-- The cost of one shim call, from its usage rows, its model and its duration.
CREATE FUNCTION shim_call_cost(p_call_sid text, p_model text, p_started timestamptz, p_ended timestamptz,
                               OUT cost_usd numeric, OUT costs jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    u record;
    p model_prices%ROWTYPE;
    minute numeric;
    minutes integer;
    model_cost numeric;
    transport_cost numeric;
BEGIN
    SELECT count(*) AS responses,
           COALESCE(sum(input_tokens), 0) AS prompt, COALESCE(sum(output_tokens), 0) AS completion,
           COALESCE(sum(cached_tokens), 0) AS cached,
           COALESCE(sum(input_text_tokens - cached_text_tokens), 0) AS text_in,
           COALESCE(sum(cached_text_tokens), 0) AS text_cached,
           COALESCE(sum(input_audio_tokens - cached_audio_tokens), 0) AS audio_in,
           COALESCE(sum(cached_audio_tokens), 0) AS audio_cached,
           COALESCE(sum(input_image_tokens - cached_image_tokens), 0) AS image_in,
           COALESCE(sum(cached_image_tokens), 0) AS image_cached,
           COALESCE(sum(output_text_tokens), 0) AS text_out,
           COALESCE(sum(output_audio_tokens), 0) AS audio_out
      INTO u FROM model_usage WHERE call_sid = p_call_sid;
    SELECT * INTO p FROM model_prices
     WHERE p_model = model
        -- a dated snapshot of a priced model; a bare prefix would price gpt-realtime-2 as gpt-realtime
        OR (starts_with(p_model, model || '-') AND substr(p_model, length(model) + 2) ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$')
     ORDER BY length(model) DESC LIMIT 1;
    IF FOUND THEN
        model_cost := ((u.text_in * p.input_text + u.text_cached * p.cached_input_text
                           + u.audio_in * p.input_audio + u.audio_cached * p.cached_input_audio
                           + u.image_in * p.input_image + u.image_cached * p.cached_input_image
                           + u.text_out * p.output_text + u.audio_out * p.output_audio) / 1000000)::numeric(20, 10);
    END IF;
    costs := '[]'::jsonb;
    IF p_started IS NOT NULL AND p_ended IS NOT NULL THEN
        minutes := ceil(greatest(extract(epoch FROM p_ended - p_started), 0) / 60);
        SELECT usd_per_minute INTO minute FROM minute_prices WHERE item = 'twilio';
        transport_cost := minutes * COALESCE(minute, 0);
        costs := costs || jsonb_build_array(jsonb_build_object(
            'type', 'transport', 'provider', 'twilio', 'minutes', minutes, 'cost', transport_cost));
    END IF;
    IF u.responses > 0 THEN
        costs := costs || jsonb_build_array(jsonb_build_object(
            'type', 'model', 'model', jsonb_build_object('provider', 'openai', 'model', p_model),
            'promptTokens', u.prompt, 'completionTokens', u.completion, 'cachedPromptTokens', u.cached,
            'cost', COALESCE(model_cost, 0)));
    END IF;
    -- Unknown when the model has no price: a guess would be worse than null.
    IF u.responses > 0 AND model_cost IS NULL THEN
        cost_usd := NULL;
    ELSE
        cost_usd := COALESCE(model_cost, 0) + COALESCE(transport_cost, 0);
    END IF;
END $$;

COMMENT ON FUNCTION shim_call_cost(text, text, timestamptz, timestamptz) IS 'Cost of one shim call (USD, and Vapi-shaped costs[]) from model_usage, model_prices and minute_prices.';

CREATE FUNCTION calls_set_cost() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.stack = 'shim' THEN
        SELECT c.cost_usd, c.costs INTO NEW.cost_usd, NEW.costs
          FROM shim_call_cost(NEW.call_sid, NEW.model, NEW.started_at, NEW.ended_at) c;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER calls_set_cost BEFORE INSERT OR UPDATE ON calls FOR EACH ROW EXECUTE FUNCTION calls_set_cost();

CREATE FUNCTION model_usage_touch_call() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Re-runs calls_set_cost for the call (a no-op when its row has not arrived yet).
    UPDATE calls SET cost_usd = cost_usd WHERE call_sid = NEW.call_sid AND stack = 'shim';
    RETURN NULL;
END $$;

CREATE TRIGGER model_usage_touch_call AFTER INSERT OR UPDATE ON model_usage FOR EACH ROW EXECUTE FUNCTION model_usage_touch_call();

-- One row per call with the figures people compare across stacks.
CREATE VIEW call_rollup AS
SELECT c.call_sid,
       c.stack,
       c.assistant_id,
       c.started_at,
       c.ended_at,
       c.ended_reason,
       extract(epoch FROM c.ended_at - c.started_at)::numeric(12, 3) AS duration_s,
       (SELECT count(*) FROM utterances u WHERE u.call_sid = c.call_sid) AS turns,
       (SELECT count(*) FROM utterances u WHERE u.call_sid = c.call_sid AND u.interrupted) AS interruptions,
       (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY u.latency_ms) FROM utterances u
         WHERE u.call_sid = c.call_sid AND u.role = 'assistant' AND u.latency_ms IS NOT NULL) AS latency_p50_ms,
       (SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY u.latency_ms) FROM utterances u
         WHERE u.call_sid = c.call_sid AND u.role = 'assistant' AND u.latency_ms IS NOT NULL) AS latency_p95_ms,
       (SELECT count(*) FROM tool_calls t WHERE t.call_sid = c.call_sid) AS tool_calls,
       (SELECT count(*) FROM tool_calls t WHERE t.call_sid = c.call_sid AND t.status IN ('error', 'timeout')) AS tool_failures,
       c.cost_usd,
       CASE WHEN c.ended_at > c.started_at
            THEN round(c.cost_usd / (extract(epoch FROM c.ended_at - c.started_at) / 60), 6) END AS cost_per_minute_usd
  FROM calls c;

COMMENT ON VIEW call_rollup IS 'One row per call: duration, turns, interruptions, assistant turn latency p50/p95 (ms), tool calls and failures (error/timeout), cost (USD) and cost per minute of call time.';

CREATE TABLE parity_runs (
    run_id          uuid PRIMARY KEY,
    batch_id        uuid NOT NULL,
    scenario        text NOT NULL,
    assistant_id    text,
    stack           text NOT NULL CHECK (stack IN ('shim', 'vapi')),
    call_sid        text,
    vapi_call_id    text,
    status          text NOT NULL CHECK (status IN ('ok', 'failed', 'partial')),
    turns_played    integer NOT NULL DEFAULT 0,
    turns_total     integer NOT NULL DEFAULT 0,
    tools           text[] NOT NULL DEFAULT '{}',
    tool_arguments  jsonb,
    turn_latency_ms integer[] NOT NULL DEFAULT '{}',
    transcript      jsonb,
    ended_reason    text,
    cost_usd        numeric,
    error           text,
    started_at      timestamptz NOT NULL,
    ended_at        timestamptz
);

COMMENT ON TABLE parity_runs IS 'One row per scripted run of a scenario on one stack (shim parity run / replay).';
COMMENT ON COLUMN parity_runs.run_id IS 'Id of this run.';
COMMENT ON COLUMN parity_runs.batch_id IS 'The invocation of shim parity run (or replay) that made this run; runs of one batch are compared together.';
COMMENT ON COLUMN parity_runs.scenario IS 'Scenario name (the file''s name field; replays: replay:<vapi call id>).';
COMMENT ON COLUMN parity_runs.assistant_id IS 'Assistant the scenario targets (the file''s assistant field), when given.';
COMMENT ON COLUMN parity_runs.stack IS 'Which stack was called: ''shim'' or ''vapi''.';
COMMENT ON COLUMN parity_runs.call_sid IS 'The shim''s call (calls.call_sid), for stack shim.';
COMMENT ON COLUMN parity_runs.vapi_call_id IS 'Vapi''s call id, for stack vapi.';
COMMENT ON COLUMN parity_runs.status IS '''ok'' (every turn played, the call ended), ''partial'' (interrupted: some turns not played, or the call dropped early) or ''failed'' (no call).';
COMMENT ON COLUMN parity_runs.turns_played IS 'Scenario turns played before the run ended.';
COMMENT ON COLUMN parity_runs.turns_total IS 'Scenario turns in the scenario.';
COMMENT ON COLUMN parity_runs.tools IS 'Names of the tools the agent called, in call order.';
COMMENT ON COLUMN parity_runs.tool_arguments IS 'The tool calls with their arguments, in call order: [{"name", "arguments"}].';
COMMENT ON COLUMN parity_runs.turn_latency_ms IS 'Per caller turn: milliseconds from the end of the caller''s audio to the first agent audio, measured at the player.';
COMMENT ON COLUMN parity_runs.transcript IS 'The conversation as the stack recorded it: [{"role", "text"}].';
COMMENT ON COLUMN parity_runs.ended_reason IS 'How the call ended (Vapi endedReason names on both stacks).';
COMMENT ON COLUMN parity_runs.cost_usd IS 'What the call cost (calls.cost_usd for the shim, Vapi''s call.cost for Vapi).';
COMMENT ON COLUMN parity_runs.error IS 'Why the run failed or was partial.';
COMMENT ON COLUMN parity_runs.started_at IS 'When the run started (before the call was placed).';
COMMENT ON COLUMN parity_runs.ended_at IS 'When the run ended.';

CREATE INDEX parity_runs_scenario_idx ON parity_runs (scenario, stack, started_at);
CREATE INDEX parity_runs_batch_idx ON parity_runs (batch_id);

-- Per run or real call: what the report aggregates. Traffic = calls that no parity run made.
CREATE VIEW parity_observations AS
-- Duration and cost of a run are its call's, once the call row is there: the run's own span also
-- covers placing the call and reading its outcome afterwards (seconds of polling, not of talk).
SELECT r.scenario, r.stack, r.assistant_id, r.status, r.started_at,
       r.tools, r.turn_latency_ms AS latencies_ms, r.ended_reason, COALESCE(c.cost_usd, r.cost_usd) AS cost_usd,
       COALESCE(extract(epoch FROM c.ended_at - c.started_at), extract(epoch FROM r.ended_at - r.started_at))::float8 AS seconds,
       COALESCE(r.call_sid, r.vapi_call_id) AS call_id
  FROM parity_runs r
  LEFT JOIN calls c ON c.call_sid = COALESCE(r.call_sid, r.vapi_call_id)
UNION ALL
SELECT 'traffic', c.stack, c.assistant_id, 'ok', c.started_at,
       ARRAY(SELECT t.name FROM tool_calls t WHERE t.call_sid = c.call_sid ORDER BY t.seq),
       ARRAY(SELECT u.latency_ms FROM utterances u
              WHERE u.call_sid = c.call_sid AND u.role = 'assistant' AND u.latency_ms IS NOT NULL
              ORDER BY u.started_at, u.seq),
       c.ended_reason, c.cost_usd,
       extract(epoch FROM c.ended_at - c.started_at)::float8,
       c.call_sid
  FROM calls c
 WHERE c.ended_at IS NOT NULL
   -- made by a run; a replay's row for the real Vapi call it replays (scenario replay:<id>) is no run of it
   AND NOT EXISTS (SELECT 1 FROM parity_runs r
                    WHERE r.call_sid = c.call_sid
                       OR (r.vapi_call_id = c.call_sid AND r.scenario IS DISTINCT FROM 'replay:' || r.vapi_call_id));

COMMENT ON VIEW parity_observations IS 'One row per parity run, and per real call (scenario ''traffic'') not made by a run: tool sequence, turn latencies, ended reason, cost, duration.';

CREATE FUNCTION parity_report(p_assistant text DEFAULT NULL, p_since timestamptz DEFAULT NULL)
RETURNS TABLE (scenario text, stack text, runs bigint, partial bigint, failed bigint, modal_tools text[],
               agreement float8, drift boolean, latency_p50_ms float8, latency_p95_ms float8,
               duration_p50_s float8, cost_per_minute_usd numeric, ended_reasons jsonb)
LANGUAGE sql STABLE AS $$
WITH obs AS (
    -- cohort: real calls are compared with the other stack's calls of the same assistant only
    SELECT o.*, CASE WHEN o.scenario = 'traffic' THEN COALESCE(o.assistant_id, '') ELSE '' END AS cohort
      FROM parity_observations o
     WHERE (p_assistant IS NULL OR o.assistant_id = p_assistant)
       AND (p_since IS NULL OR o.started_at >= p_since)
), ok AS (
    SELECT * FROM obs WHERE obs.status = 'ok'
), seqs AS (
    SELECT ok.scenario, ok.cohort, ok.stack, ok.tools, count(*) AS n FROM ok GROUP BY 1, 2, 3, 4
), modal AS (
    -- the most common sequence; ties go to the sequence that sorts first (element by element, in
    -- byte order, a prefix before its extensions: no tools first), whatever the database's collation
    SELECT DISTINCT ON (s.scenario, s.stack) s.scenario, s.stack, s.tools
      FROM (SELECT seqs.scenario, seqs.stack, seqs.tools, sum(seqs.n) AS n FROM seqs GROUP BY 1, 2, 3) s
     ORDER BY s.scenario, s.stack, s.n DESC, s.tools COLLATE "C"
), cohort_modal AS (
    SELECT DISTINCT ON (seqs.scenario, seqs.cohort, seqs.stack) seqs.scenario, seqs.cohort, seqs.stack, seqs.tools
      FROM seqs ORDER BY seqs.scenario, seqs.cohort, seqs.stack, seqs.n DESC, seqs.tools COLLATE "C"
), agree AS (
    SELECT ok.scenario, ok.stack, avg((ok.tools = m.tools)::int)::float8 AS agreement
      FROM ok JOIN cohort_modal m ON m.scenario = ok.scenario AND m.cohort = ok.cohort AND m.stack <> ok.stack
     GROUP BY 1, 2
), lat AS (
    SELECT ok.scenario, ok.stack,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY l) AS p50,
           percentile_cont(0.95) WITHIN GROUP (ORDER BY l) AS p95
      FROM ok, unnest(ok.latencies_ms) AS l GROUP BY 1, 2
), figures AS (
    SELECT obs.scenario, obs.stack,
           count(*) FILTER (WHERE obs.status = 'ok') AS runs,
           count(*) FILTER (WHERE obs.status = 'partial') AS partial,
           count(*) FILTER (WHERE obs.status = 'failed') AS failed,
           percentile_cont(0.5) WITHIN GROUP (ORDER BY obs.seconds) FILTER (WHERE obs.status = 'ok') AS duration_p50_s,
           round(sum(obs.cost_usd) FILTER (WHERE obs.status = 'ok' AND obs.cost_usd IS NOT NULL AND obs.seconds > 0)
                 / nullif(sum(obs.seconds) FILTER (WHERE obs.status = 'ok' AND obs.cost_usd IS NOT NULL AND obs.seconds > 0), 0)::numeric
                 * 60, 6) AS cost_per_minute_usd
      FROM obs GROUP BY 1, 2
), reasons AS (
    SELECT r.scenario, r.stack, jsonb_object_agg(r.reason, r.n) AS ended_reasons
      FROM (SELECT ok.scenario, ok.stack, COALESCE(ok.ended_reason, 'unknown') AS reason, count(*) AS n
              FROM ok GROUP BY 1, 2, 3) r
     GROUP BY 1, 2
)
SELECT f.scenario, f.stack, f.runs, f.partial, f.failed, m.tools, a.agreement,
       COALESCE(a.agreement < 0.95, false), l.p50, l.p95, f.duration_p50_s, f.cost_per_minute_usd,
       COALESCE(r.ended_reasons, '{}'::jsonb)
  FROM figures f
  LEFT JOIN modal m USING (scenario, stack)
  LEFT JOIN agree a USING (scenario, stack)
  LEFT JOIN lat l USING (scenario, stack)
  LEFT JOIN reasons r USING (scenario, stack)
 ORDER BY f.scenario = 'traffic', f.scenario, f.stack
$$;

COMMENT ON FUNCTION parity_report(text, timestamptz) IS 'The parity report (shim parity report): per scenario (or ''traffic'') and stack, runs, the modal tool sequence (ties: the first in byte order), agreement with the other stack''s modal sequence (null without runs on the other stack; traffic: of the same assistant), drift (agreement < 0.95), turn latency p50/p95, median duration, cost per minute, ended reasons. Arguments filter by assistant and start time.';

CREATE VIEW parity_report AS SELECT * FROM parity_report(NULL, NULL);

COMMENT ON VIEW parity_report IS 'parity_report() over everything: SELECT * FROM parity_report; filter with SELECT * FROM parity_report(''assistant-id'', now() - interval ''7 days'').';

CREATE VIEW parity_tool_arguments AS
SELECT r.scenario, r.stack, t.ordinality AS position, t.call->>'name' AS tool, t.call->'arguments' AS arguments,
       count(*) AS runs
  FROM parity_runs r, jsonb_array_elements(COALESCE(r.tool_arguments, '[]'::jsonb)) WITH ORDINALITY AS t(call, ordinality)
 WHERE r.status = 'ok'
 GROUP BY 1, 2, 3, 4, 5;

COMMENT ON VIEW parity_tool_arguments IS 'Argument differences per tool: for each scenario, stack and position in the tool sequence, each distinct set of arguments and how many runs passed it.';

COMMENT ON COLUMN call_rollup.call_sid IS 'The call (calls.call_sid; Vapi''s call id for imported Vapi calls).';
COMMENT ON COLUMN call_rollup.stack IS 'Which stack handled the call: ''shim'' or ''vapi''.';
COMMENT ON COLUMN call_rollup.assistant_id IS 'Assistant that answered the call.';
COMMENT ON COLUMN call_rollup.started_at IS 'When the call started.';
COMMENT ON COLUMN call_rollup.ended_at IS 'When the call ended.';
COMMENT ON COLUMN call_rollup.ended_reason IS 'Why the call ended (Vapi endedReason names).';
COMMENT ON COLUMN call_rollup.duration_s IS 'Call duration in seconds (ended_at - started_at).';
COMMENT ON COLUMN call_rollup.turns IS 'Spoken turns (utterances), both sides.';
COMMENT ON COLUMN call_rollup.interruptions IS 'Assistant turns the caller interrupted.';
COMMENT ON COLUMN call_rollup.latency_p50_ms IS 'Median assistant turn latency (caller''s end of speech to first assistant audio), ms.';
COMMENT ON COLUMN call_rollup.latency_p95_ms IS '95th percentile assistant turn latency, ms.';
COMMENT ON COLUMN call_rollup.tool_calls IS 'Tool calls made during the call.';
COMMENT ON COLUMN call_rollup.tool_failures IS 'Tool calls that failed (status error or timeout).';
COMMENT ON COLUMN call_rollup.cost_usd IS 'What the call cost, USD (calls.cost_usd).';
COMMENT ON COLUMN call_rollup.cost_per_minute_usd IS 'cost_usd per minute of call time.';

COMMENT ON COLUMN parity_observations.scenario IS 'Scenario name, or ''traffic'' for real calls.';
COMMENT ON COLUMN parity_observations.stack IS '''shim'' or ''vapi''.';
COMMENT ON COLUMN parity_observations.assistant_id IS 'Assistant of the run or call.';
COMMENT ON COLUMN parity_observations.status IS 'Run status (''ok'', ''partial'', ''failed''); ''ok'' for real calls.';
COMMENT ON COLUMN parity_observations.started_at IS 'When the run or call started.';
COMMENT ON COLUMN parity_observations.tools IS 'Tool names in call order.';
COMMENT ON COLUMN parity_observations.latencies_ms IS 'Turn latencies, ms.';
COMMENT ON COLUMN parity_observations.ended_reason IS 'How the call ended.';
COMMENT ON COLUMN parity_observations.cost_usd IS 'What the call cost, USD (runs: their call''s current calls.cost_usd when the call row exists).';
COMMENT ON COLUMN parity_observations.seconds IS 'Call duration in seconds (runs: their call''s, when the call row exists; else the run''s span).';
COMMENT ON COLUMN parity_observations.call_id IS 'The shim''s CallSid or Vapi''s call id.';

COMMENT ON COLUMN parity_report.scenario IS 'Scenario name, or ''traffic'' (real calls: imported Vapi calls vs the shim''s calls).';
COMMENT ON COLUMN parity_report.stack IS '''shim'' or ''vapi''.';
COMMENT ON COLUMN parity_report.runs IS 'Runs (or calls) with status ok: the ones every figure is computed from.';
COMMENT ON COLUMN parity_report.partial IS 'Runs interrupted part-way (not in the figures).';
COMMENT ON COLUMN parity_report.failed IS 'Runs that placed no call (not in the figures).';
COMMENT ON COLUMN parity_report.modal_tools IS 'The most common tool sequence of this stack''s runs; on a tie, the one first in byte order, element by element (no tools first).';
COMMENT ON COLUMN parity_report.agreement IS 'Share (0..1) of this stack''s ok runs whose tool sequence equals the other stack''s modal_tools; null when the other stack has no ok runs. Traffic: each call against the other stack''s most common sequence for the same assistant (calls of an assistant without traffic on the other stack are left out).';
COMMENT ON COLUMN parity_report.drift IS 'agreement < 0.95.';
COMMENT ON COLUMN parity_report.latency_p50_ms IS 'Median turn latency over all turns of the runs, ms.';
COMMENT ON COLUMN parity_report.latency_p95_ms IS '95th percentile turn latency, ms.';
COMMENT ON COLUMN parity_report.duration_p50_s IS 'Median run (call) duration, seconds.';
COMMENT ON COLUMN parity_report.cost_per_minute_usd IS 'Total cost / total minutes of the runs with a known cost, USD.';
COMMENT ON COLUMN parity_report.ended_reasons IS 'How the runs ended: {"endedReason": count}.';

COMMENT ON COLUMN parity_tool_arguments.scenario IS 'Scenario name.';
COMMENT ON COLUMN parity_tool_arguments.stack IS '''shim'' or ''vapi''.';
COMMENT ON COLUMN parity_tool_arguments.position IS 'Position of the tool call in the run''s sequence, from 1.';
COMMENT ON COLUMN parity_tool_arguments.tool IS 'Tool name.';
COMMENT ON COLUMN parity_tool_arguments.arguments IS 'The arguments passed, as JSON.';
COMMENT ON COLUMN parity_tool_arguments.runs IS 'How many ok runs passed exactly these arguments at this position.';
