// Types of @rtserver/client (src/index.js).

export type ConnectionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

/** A subscription filter (docs/protocol.md §4). */
export interface Filter {
  operations?: Array<"INSERT" | "UPDATE" | "DELETE" | "TRUNCATE" | "REPLACE" | "PUBLISH">;
  /** Narrows a `*` channel to one table/collection/topic. */
  entity?: string;
  predicates?: Record<string, unknown>;
  /** Also deliver the UPDATEs after which a row stops matching (`transition: "leave"`), and
   * mark those after which it starts to (`transition: "enter"`). Default false. */
  transitions?: boolean;
}

/** A change pushed by the gateway (docs/protocol.md §5). */
export interface RealtimeEvent {
  type: "event";
  channel: string;
  operation: string;
  seq: number;
  timestamp: string;
  correlationId: string;
  /** With `filter.transitions`: the UPDATE made the row stop ("leave") or start ("enter")
   * matching the filter's predicates; absent when it matched before and after. */
  transition?: "enter" | "leave";
  /** postgres */
  table?: string;
  schema?: string;
  record?: Record<string, unknown> | null;
  oldRecord?: Record<string, unknown> | null;
  changedColumns?: string[];
  /** mongo */
  collection?: string;
  document?: Record<string, unknown> | null;
  operationType?: "insert" | "update" | "replace" | "delete";
  updateDescription?: {
    updatedFields: Record<string, unknown>;
    removedFields: string[];
    truncatedArrays?: Array<{ field: string; newSize: number }>;
  };
  /** The pre-image, for collections with pre-images enabled (docs/mongo.md). */
  oldDocument?: Record<string, unknown> | null;
  /** events */
  topic?: string;
  payload?: unknown;
}

/** Events after `since` may be missing: the gateway's history no longer held them. */
export interface HistoryGap {
  type: "history_gap";
  code: 4011;
  channel: string;
  oldest: number;
  message: string;
}

export interface ConnectOptions {
  /** ws(s)://host/workspaces/{workspaceId}/realtime/connect */
  url: string;
  /** Called for every connection and every refresh. */
  getToken: () => string | Promise<string>;
  /** Node only: send the token as `Authorization: Bearer` (uses the `ws` package). Sessions
   * are then not resumed but re-subscribed with `since` on reconnect. */
  headerAuth?: boolean;
  /** A WebSocket class to use instead of globalThis.WebSocket / `ws`. */
  WebSocket?: unknown;
  /** First reconnect delay (default 1000), doubled per failure up to backoffMaxMs (30000);
   * each wait is up to half as long again at random, never over backoffMaxMs. */
  backoffInitialMs?: number;
  backoffMaxMs?: number;
  /** Refresh the token in-band this long before `exp` (default 30000, at most 25% of the time
   * left). The time left is never taken as longer than the token's lifetime (`exp - iat`), and
   * a refresh comes at least a quarter of that lifetime (10 s without `iat`) after the previous
   * one: a device clock ahead of the issuer's cannot make it refresh in a loop. */
  refreshMarginMs?: number;
  /** Default true. When false, the client only refreshes after the gateway closes with 4001. */
  proactiveRefresh?: boolean;
  /** An application ping after this much silence (default 25000); no answer within
   * pongTimeoutMs (10000) counts as a lost connection. Its pong carries the stream position,
   * which a quiet subscription resumes from (no needless history_gap in a busy workspace). One
   * is also sent after each history_gap, so a source's loss told live is not told again by the
   * next resume. 0 turns these pings off (and with them the detection of a dead link). */
  pingIntervalMs?: number;
  pongTimeoutMs?: number;
  /** Unread items an events() iterator may hold before it fails (default 10000). */
  maxBufferedEvents?: number;
  /** The gateway's limits.max_message_bytes (default 65536): a subscribe whose message would
   * be larger is refused at once, its `ready` rejected with a RealtimeError whose codeName is
   * "message_too_big" (the gateway would close the whole connection with 1009, which ends the
   * client). */
  maxMessageBytes?: number;
  /** A connection attempt whose WebSocket upgrade has not completed after this long is
   * abandoned and counts as a failed attempt (backoff; reported once as "connect_failed" until
   * a connection succeeds); default 10000. A getToken call (at
   * connect or for a refresh) that has not settled after this long counts as a failing one
   * (token_unavailable). */
  openTimeoutMs?: number;
}

export declare const TERMINAL_CODES: readonly number[];

export declare class RealtimeError extends Error {
  constructor(code: number, message?: string, details?: { name?: string; channel?: string; terminal?: boolean });
  /** The close or error code (4001 token_expired, 4002, 4003, 4010, ...); 0 for client-side
   * errors; the HTTP status for codeName "upgrade_refused". */
  code: number;
  /** The code's name, or for code 0: "token_unavailable" (getToken failed),
   * "buffer_overflow" (an events() iterator), "websocket_unavailable" (terminal), "error";
   * "upgrade_refused": an HTTP status instead of the upgrade (with the `ws` package only),
   * terminal for 404 before any connection succeeded (a wrong URL), else retried and reported
   * once per distinct status; "connect_failed" (code 0): no HTTP answer at all (refused,
   * unreachable; with the `ws` package only) or no upgrade within openTimeoutMs, retried,
   * reported once per kind of failure. For a
   * close the client retries (reported once per distinct code until a connection succeeds):
   * "internal_error" (1011: the token could not be checked now), "try_again_later" (1013),
   * "going_away" (1001), "quota_exceeded" (4008), "abnormal_closure" (1006: a lost link),
   * "token_invalid" (4002 after "auth timeout"). */
  codeName: string;
  /** For token_unavailable: what getToken threw. */
  cause?: unknown;
  channel?: string;
  /** True when the client stopped for good (4002, but not after the error "auth timeout",
   * which is retried; 4003, 1008, 1009, HTTP 404 to the upgrade before any connection
   * succeeded). */
  terminal: boolean;
}

export interface Unsubscribe {
  (): void;
  /** Resolves when the gateway confirms the subscription (waiting across reconnects); rejects
   * with a RealtimeError when it refuses (4010, 4003, 4008, 4000: the channel is then not
   * subscribed, not even with the filter this one was to replace), when the channel is
   * unsubscribed or the client closes first, or at once when the client was already closed. */
  ready: Promise<void>;
}

export interface OpenInfo {
  sessionId: string;
  resumed: boolean;
  expiresAt?: string;
}

export declare class RealtimeClient {
  constructor(options: ConnectOptions);
  readonly url: string;
  readonly state: ConnectionState;
  readonly sessionId: string | null;
  /** The highest `seq` delivered. Resumes and re-subscribes ask for what follows it (while
   * the replays after a reconnect are still arriving: what follows the `seq` up to which
   * everything had been delivered). */
  readonly lastSeq: number | null;
  /** Failed connection attempts since the last success (drives the backoff). */
  readonly attempt: number;
  /** The terminal error, once closed by one. */
  readonly error: RealtimeError | null;
  /** Resolves on the first auth_ok; rejects on a terminal error or close(). */
  readonly ready: Promise<{ sessionId: string; resumed: boolean }>;
  /** Resolves after close(); rejects with the terminal RealtimeError. */
  readonly closed: Promise<void>;

  /** Throws a TypeError, registering nothing, for a filter JSON cannot carry (a BigInt, a cycle,
   * NaN, Infinity). */
  subscribe(channel: string, onEvent?: (event: RealtimeEvent) => void): Unsubscribe;
  subscribe(channel: string, filter: Filter | null | undefined, onEvent?: (event: RealtimeEvent) => void): Unsubscribe;
  unsubscribe(channel: string): void;
  /** Events and gap notices from now on, optionally of one subscribed channel. Create it
   * before awaiting anything: it buffers from this call on (one dropped before it is iterated
   * stops once garbage-collected). One obtained after close() or a terminal error throws a
   * RealtimeError when iterated. */
  events(channel?: string): AsyncIterableIterator<RealtimeEvent | HistoryGap>;
  on(name: "state", fn: (state: ConnectionState) => void): () => void;
  on(name: "event", fn: (event: RealtimeEvent) => void): () => void;
  on(name: "gap", fn: (gap: HistoryGap) => void): () => void;
  /** A gateway error, a terminal close, a failing getToken (codeName "token_unavailable",
   * `cause`: what it threw; the client retries), or an upgrade refused with an HTTP status
   * (codeName "upgrade_refused": 404 before any connection terminal, others retried, reported
   * once per status), or a connect that got no HTTP answer (codeName "connect_failed", retried,
   * reported once per kind of failure), or a close the client retries (`code` the close code,
   * its message the close reason and the gateway's error before it; reported once per distinct
   * code until a connection succeeds; not a 4001, which is followed by a fresh token). */
  on(name: "error", fn: (error: RealtimeError) => void): () => void;
  on(name: "open", fn: (info: OpenInfo) => void): () => void;
  on(name: "close", fn: (info: { code: number; reason: string }) => void): () => void;
  /** Closes for good: sends a close 1000; with the `ws` package (Node.js), a link that has not
   * answered it within a second is dropped, so a dead link does not hold the process. */
  close(): void;
}

export declare function connect(options: ConnectOptions): RealtimeClient;
export declare function tokenExpiry(token: string): number | null;
export declare function channelMatches(channel: string, eventChannel: string, filter?: Filter | null): boolean;
/** The subscription `channel` is at the gateway: `postgres:public.orders` is `postgres:orders`. */
export declare function subscriptionKey(channel: string): string;
export default connect;
