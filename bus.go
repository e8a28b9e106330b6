package imgcache

import (
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/cespare/xxhash/v2"
	"github.com/redis/go-redis/v9"
)

// The invalidation bus keeps every instance's L1 coherent: each write and invalidation publishes a
// message on the namespace's channel, and every other instance drops the L1 entries it names.
//
// Pub/sub delivers at most once, and not at all while a subscriber is disconnected. An instance
// therefore flushes its whole L1 each time its subscription is (re)established: whatever it missed
// in the gap is gone with everything else. While the subscription is down L1 keeps serving, each
// entry for at most L1TTL: that is the staleness bound during a disconnection.
//
// A message is: version byte (1), kind byte, the sender's instance id (8 bytes, big-endian), a
// uvarint count of items, and each item as a uvarint length and its bytes.
const busVersion = 1

type busKind byte

const (
	busKeys    busKind = 1 // items: canonical keys (Key.s)
	busEntity  busKind = 2 // items: entity, id
	busTags    busKind = 3 // items: tags
	busPattern busKind = 4 // items: the pattern as given to InvalidatePattern
	busSet     busKind = 5 // items: a canonical key, and the written envelope's xxhash (8 bytes, big-endian)
)

// maxBusItems bounds a message's item count when decoding, so a corrupt count cannot ask for a
// large allocation.
const maxBusItems = 1 << 16

type busMsg struct {
	kind   busKind
	sender uint64
	items  []string
}

func encodeBus(kind busKind, sender uint64, items []string) []byte {
	n := 11
	for _, it := range items {
		n += binary.MaxVarintLen64 + len(it)
	}
	b := make([]byte, 0, n)
	b = append(b, busVersion, byte(kind))
	b = binary.BigEndian.AppendUint64(b, sender)
	b = binary.AppendUvarint(b, uint64(len(items)))
	for _, it := range items {
		b = binary.AppendUvarint(b, uint64(len(it)))
		b = append(b, it...)
	}
	return b
}

var errBadBus = errors.New("malformed bus message")

func decodeBus(data []byte) (busMsg, error) {
	if len(data) < 10 || data[0] != busVersion {
		return busMsg{}, errBadBus
	}
	m := busMsg{kind: busKind(data[1]), sender: binary.BigEndian.Uint64(data[2:10])}
	rest := data[10:]
	n, w := binary.Uvarint(rest)
	if w <= 0 || n > maxBusItems || n > uint64(len(rest)) {
		return busMsg{}, errBadBus
	}
	rest = rest[w:]
	m.items = make([]string, 0, n)
	for range n {
		l, w := binary.Uvarint(rest)
		if w <= 0 || l > uint64(len(rest)-w) {
			return busMsg{}, errBadBus
		}
		m.items = append(m.items, string(rest[w:w+int(l)]))
		rest = rest[w+int(l):]
	}
	if len(rest) != 0 {
		return busMsg{}, errBadBus
	}
	return m, nil
}

// keyFromCanonical rebuilds a Key from its canonical form as sent on the bus. It refuses a string
// with an empty entity or id, or one that does not come back unchanged when rebuilt; what it
// accepts beyond NewKey's and With's forms (an unsorted parameter list, say) matches no key in L1.
func keyFromCanonical(s string) (Key, bool) {
	if s == "" || s[0] == 0 || len(s) > MaxKeyLen {
		return Key{}, false
	}
	head, params := Key{s: s, n: len(s)}.split()
	e, id, _ := strings.Cut(head, "\x00")
	if e == "" || id == "" {
		return Key{}, false
	}
	k := makeKey(e, id, params)
	return k, k.Valid() && k.canonical() == s // not a key's form if it does not come back
}

// The subscriber is one goroutine of our own around a go-redis PubSub, not go-redis's
// ChannelWithSubscriptions: that one runs two goroutines that reconnect under the PubSub's mutex
// with contexts that have no deadline, so PubSub.Close could wait seconds behind a reconnection to a
// Redis that does not answer, and it never notices a connection that silently stopped delivering.
// Here every call into go-redis has a deadline, a quiet connection is pinged, and one that stays
// silent is replaced by a fresh subscription (whose confirmation flushes L1).
const (
	busPoll = 200 * time.Millisecond // longest a receive blocks; bounds how long Close waits
	busPing = time.Second            // ping a connection quiet for this long
	busDead = 3 * time.Second        // replace a connection quiet for this long despite pings
)

// startBus subscribes to the namespace's channel and starts the goroutine that applies messages.
// New waits, at most L2Timeout, for the first confirmation, so that a cache is subscribed before
// it serves; every later one (after a reconnection) flushes L1. If Redis does not confirm in time,
// the first confirmation that arrives flushes L1 too.
func (c *Cache[V]) startBus() {
	ps := c.subscribe()
	ctx, cancel := context.WithTimeout(c.base, c.l2.timeout)
	if m, err := ps.ReceiveTimeout(ctx, c.l2.timeout); err == nil {
		if _, ok := m.(*redis.Subscription); ok {
			c.subscribed.Store(true)
		}
	}
	cancel()
	c.busDone = make(chan struct{})
	go c.runBus(ps)
}

func (c *Cache[V]) subscribe() *redis.PubSub {
	ctx, cancel := context.WithTimeout(c.base, c.l2.timeout)
	defer cancel()
	return c.l2.rdb.Subscribe(ctx, c.l2.channel()) // a failure here is retried by receive
}

func (c *Cache[V]) runBus(ps *redis.PubSub) {
	defer close(c.busDone)
	defer func() { _ = ps.Close() }() // this goroutine is the PubSub's only user: nothing holds its lock
	heard := time.Now()
	pinged := false
	for c.base.Err() == nil {
		c.flushOutbox(c.base)
		ctx, cancel := context.WithTimeout(c.base, busPoll)
		m, err := ps.ReceiveTimeout(ctx, busPoll)
		cancel()
		if err == nil {
			heard, pinged = time.Now(), false
			switch m := m.(type) {
			case *redis.Subscription:
				if m.Kind == "subscribe" {
					// Messages sent while this instance was not subscribed are lost: drop
					// everything they might have invalidated.
					// A resubscription counts once its flush is done.
					resubscribed := c.subscribed.Swap(true)
					c.flushL1()
					if resubscribed {
						c.stats.busResubscribes.Add(1)
					}
				}
			case *redis.Message:
				c.applyBus([]byte(m.Payload))
			}
			continue
		}
		quiet := time.Since(heard)
		switch {
		case quiet > busDead:
			_ = ps.Close()
			ps = c.subscribe()
			heard, pinged = time.Now(), false
		case quiet > busPing && !pinged:
			ctx, cancel := context.WithTimeout(c.base, c.l2.timeout)
			_ = ps.Ping(ctx) // the PONG arrives through ReceiveTimeout
			cancel()
			pinged = true
		}
		var ne interface{ Timeout() bool }
		if !errors.As(err, &ne) || !ne.Timeout() {
			// Refused, reset, closed: go-redis reconnects on the next receive; do not spin.
			select {
			case <-c.base.Done():
			case <-time.After(busPoll / 2):
			}
		}
	}
}

func (c *Cache[V]) applyBus(data []byte) {
	m, err := decodeBus(data)
	if err != nil {
		c.stats.busErrors.Add(1)
		return
	}
	if m.sender == c.instance {
		return
	}
	c.stats.busReceived.Add(1)
	switch m.kind {
	case busKeys:
		keys := make([]Key, 0, len(m.items))
		for _, s := range m.items {
			if k, ok := keyFromCanonical(s); ok {
				keys = append(keys, k)
			}
		}
		c.dropL1Keys(keys)
	case busSet:
		if len(m.items) != 2 || len(m.items[1]) != 8 {
			c.stats.busErrors.Add(1)
			return
		}
		if k, ok := keyFromCanonical(m.items[0]); ok {
			c.dropL1Written(k, binary.BigEndian.Uint64([]byte(m.items[1])))
		}
	case busEntity:
		if len(m.items) == 2 {
			c.dropL1Entity(m.items[0], m.items[1])
		}
	case busTags:
		c.dropL1Tags(m.items)
	case busPattern:
		if len(m.items) == 1 {
			if p, err := parsePattern(m.items[0]); err == nil {
				c.dropL1Pattern(p)
			}
		}
	default:
		c.stats.busErrors.Add(1)
		return
	}
	if hook := c.busHook.Load(); hook != nil {
		(*hook)(m.kind)
	}
}

// sendSet tells the other instances that k was written with the envelope data: each drops its copy
// of k unless that copy was read from this very write.
func (c *Cache[V]) sendSet(ctx context.Context, k Key, data []byte) {
	c.send(ctx, busSet, []string{k.canonical(), string(binary.BigEndian.AppendUint64(nil, xxhash.Sum64(data)))})
}

// send publishes a message; a failure is counted, not returned: Redis has already been changed.
// The message then goes to the outbox, for the bus goroutine to publish once Redis answers: the
// other instances, which may not be cut off from Redis at all, must still drop and forget what the
// change made stale.
func (c *Cache[V]) send(ctx context.Context, kind busKind, items []string) {
	if c.l2 == nil {
		return
	}
	msg := encodeBus(kind, c.instance, items)
	if err := c.l2.publish(ctx, msg); err != nil {
		c.countL2Error(err)
		c.logError(ctx, "publish", c.l2.channel(), err)
		c.queue(msg)
		return
	}
	c.stats.busSent.Add(1)
}

// outbox holds the messages of invalidations that failed after they may have changed Redis: a reply
// lost after the script ran, an UNLINK that failed. Redis may hold a moved generation and the values
// it made stale, and the other instances, which trust the old generation and may hold copies in L1,
// would keep serving them. The bus goroutine publishes these messages, in order, once Redis
// answers, and Close tries once more. At most maxOutbox wait; past that a new one is dropped, and
// the other instances' copies last at most L1TTL, their trust GenerationTTL.
type outbox struct {
	mu   sync.Mutex // protects msgs
	msgs [][]byte
}

const maxOutbox = 1024

// announce tells the other instances of an invalidation whose Redis part ended with err: at once
// if it succeeded, through the outbox if it failed (it may have changed Redis in part).
func (c *Cache[V]) announce(ctx context.Context, err error, kind busKind, items []string) {
	if err != nil {
		c.sendLater(err, kind, items)
		return
	}
	c.send(ctx, kind, items)
}

// sendLater queues a message for the bus goroutine (see outbox). An error that says Redis was never
// asked (the breaker was open) changed nothing, and queues nothing, unless it is a later step's
// (afterChange): an earlier one may have changed Redis.
func (c *Cache[V]) sendLater(err error, kind busKind, items []string) {
	var later afterChange
	if c.l2 == nil || (errors.Is(err, ErrBreakerOpen) && !errors.As(err, &later)) {
		return
	}
	c.queue(encodeBus(kind, c.instance, items))
}

// afterChange is the error of an invalidation's step that runs after another has changed Redis (a
// generation, the pattern epoch or a delete epoch moved): even a refusal by the breaker then leaves
// the other instances' copies stale, and the invalidation's message must still reach them. It
// wraps the error unchanged: callers see what failed.
type afterChange struct{ error }

func (e afterChange) Unwrap() error { return e.error }

// queue puts a message in the outbox (see outbox).
func (c *Cache[V]) queue(msg []byte) {
	c.outbox.mu.Lock()
	if len(c.outbox.msgs) < maxOutbox {
		c.outbox.msgs = append(c.outbox.msgs, msg)
	}
	c.outbox.mu.Unlock()
}

// flushOutbox publishes the queued messages in order, and puts back those after one that fails
// (Redis is still away: the next round of the bus loop tries again). The failures are not counted:
// the invalidation's own failure was.
func (c *Cache[V]) flushOutbox(ctx context.Context) {
	c.outbox.mu.Lock()
	msgs := c.outbox.msgs
	c.outbox.msgs = nil
	c.outbox.mu.Unlock()
	for i, m := range msgs {
		if err := c.l2.publish(ctx, m); err != nil {
			c.outbox.mu.Lock()
			c.outbox.msgs = append(msgs[i:], c.outbox.msgs...)
			if len(c.outbox.msgs) > maxOutbox {
				c.outbox.msgs = c.outbox.msgs[:maxOutbox]
			}
			c.outbox.mu.Unlock()
			return
		}
		c.stats.busSent.Add(1)
	}
}
