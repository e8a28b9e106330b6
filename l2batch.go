package imgcache

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"

	"github.com/redis/go-redis/v9"
)

// Read batching.
//
// Under load a cache's Redis reads are bound by round trips, not by Redis: each GET costs the
// client and the server a system call to write and one to read, and the server answers one
// connection at a time. So reads do not each take a round trip of their own once enough are under
// way. Up to readsInFlight reads go to Redis as they come, exactly as they would without batching:
// a serial or lightly concurrent caller sees one GET per read. A read that finds readsInFlight
// under way queues; when one of those round trips ends, every read queued meanwhile (up to
// maxReadBatch) goes in one MGET (on a Cluster or a Ring, one pipeline of GETs, which go-redis
// splits by node), sent by the first of them and answered to each. A queued read waits for nothing
// but a round trip already under way, so batching adds no timer and no goroutine, and it only ever
// fills round trips that the reads would otherwise have queued behind in the connection pool.
//
// Measured on the 2-core reference machine (README, Performance): 64 goroutines reading 200-byte
// values through Get spend about a third of the time per read that they do with a GET each.
//
// What a queued read keeps: its own context and the L2Timeout budget, counted from when it queued;
// a read that gives up while its batch is in flight gets its own error and the batch goes on for
// the others. What it shares: a batch is one Redis call to the breaker (one observation, and one
// skip when the breaker is open), and a batch that fails fails every read in it, each counted in
// L2Errors as its caller's read.

const (
	// readsInFlight is how many reads go to Redis without waiting for another to end. 4 lets two
	// cores keep Redis busy without batching at low concurrency; 1 halves throughput at two
	// goroutines, and more leaves round trips unfilled at high concurrency.
	readsInFlight = 4
	// maxReadBatch bounds the reads sent in one round trip, and so the size of one reply.
	maxReadBatch = 256
)

// readBatcher counts a l2's reads in flight and queues the ones that wait for a batch.
type readBatcher struct {
	mu       sync.Mutex
	inflight int            // round trips of reads under way, batches included
	queue    []*pendingRead // reads waiting for a round trip to end
	batched  atomic.Uint64  // reads sent in a batch of more than one (Stats.L2ReadsBatched)
}

// readReply is what one read found: each key's value, and whether the key exists.
type readReply struct {
	val [2]string
	ok  [2]bool
}

// pendingRead is a queued read.
type pendingRead struct {
	ctx  context.Context
	keys [2]string
	n    int // keys read: 1 or 2

	// ready is signalled once: when reply and err are set, or when this read must send batch.
	ready chan struct{}
	batch []*pendingRead // set, under readBatcher.mu, for the read that sends its batch
	taken bool           // under readBatcher.mu: the read is in a batch and no longer queued

	reply readReply
	err   error
}

// read reads key, and genKey unless it is "" (an entity's generation, read with the value), in one
// round trip, batched with other reads when readsInFlight are under way. An absent key is not an
// error: its ok is false.
func (l *l2) read(ctx context.Context, key, genKey string) (readReply, error) {
	b := &l.reads
	b.mu.Lock()
	if b.inflight < readsInFlight {
		b.inflight++
		b.mu.Unlock()
		defer l.readDone()
		return l.readAlone(ctx, key, genKey)
	}
	if err := ctx.Err(); err != nil {
		b.mu.Unlock()
		return readReply{}, err // the caller has left: do not queue, as call would not ask
	}
	p := &pendingRead{ctx: ctx, keys: [2]string{key, genKey}, n: 1, ready: make(chan struct{}, 1)}
	if genKey != "" {
		p.n = 2
	}
	b.queue = append(b.queue, p)
	b.mu.Unlock()
	return l.await(p)
}

// readAlone reads key (and genKey) in a round trip of its own: GET, or MGET of both keys on a
// single Redis, a pipeline of two GETs elsewhere (the keys are in different slots).
func (l *l2) readAlone(ctx context.Context, key, genKey string) (r readReply, err error) {
	if genKey == "" {
		err = l.call(ctx, func(ctx context.Context) error {
			var gerr error
			r.val[0], gerr = l.rdb.Get(ctx, key).Result()
			r.ok[0] = gerr == nil
			return pipelineErr(gerr) // an absent key is a reply
		})
		return r, err
	}
	if single, ok := l.rdb.(*redis.Client); ok {
		err = l.call(ctx, func(ctx context.Context) error {
			res, err := single.MGet(ctx, key, genKey).Result()
			if err == nil && len(res) == 2 {
				r.val[0], r.ok[0] = res[0].(string)
				r.val[1], r.ok[1] = res[1].(string)
			}
			return err
		})
		return r, err
	}
	var a, g *redis.StringCmd
	err = l.pipelined(ctx, func(ctx context.Context, p redis.Pipeliner) {
		a, g = p.Get(ctx, key), p.Get(ctx, genKey)
	})
	if err == nil {
		r.val[0], r.ok[0] = stringReply(a)
		r.val[1], r.ok[1] = stringReply(g)
	}
	return r, err
}

// stringReply returns a GET's value, ok false when the key is absent.
func stringReply(cmd *redis.StringCmd) (string, bool) {
	s, err := cmd.Result()
	return s, err == nil
}

// await waits for a queued read's reply: from the batch it joins, or from the Redis call it sends
// when it comes first in its batch. It gives up when its caller's context ends or L2Timeout has
// passed since it queued.
func (l *l2) await(p *pendingRead) (readReply, error) {
	var expired <-chan struct{}
	if t := deadlineTicks.get(preciseNow() + int64(l.timeout)); t != nil {
		expired = t.done
	} else { // every Cache is closed: no clock goroutine closes ticks
		ctx, cancel := context.WithTimeout(context.Background(), l.timeout)
		defer cancel()
		expired = ctx.Done()
	}
	var err error
	select {
	case <-p.ready:
	case <-p.ctx.Done():
		err = p.ctx.Err()
	case <-expired:
		err = context.DeadlineExceeded
	}
	if err != nil {
		if !l.reads.leave(p) {
			return readReply{}, err // the batch answers no one for p: ready has room for its signal
		}
		<-p.ready // p sends its batch: the others wait for it
	}
	if p.batch != nil {
		l.sendBatch(p)
	}
	if err != nil {
		return readReply{}, err
	}
	return p.reply, p.err
}

// leave takes a read that gives up out of the queue. It reports whether the read must stay: it
// has been chosen to send its batch.
func (b *readBatcher) leave(p *pendingRead) (mustSend bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !p.taken {
		for i, q := range b.queue {
			if q == p {
				b.queue = append(b.queue[:i], b.queue[i+1:]...)
				break
			}
		}
		return false
	}
	return p.batch != nil
}

// readDone ends a round trip of reads. If reads queued meanwhile, the round trip's place passes to
// them: they go as one batch, sent by the first.
func (l *l2) readDone() {
	l.reads.mu.Lock()
	lead := l.reads.next()
	l.reads.mu.Unlock()
	if lead != nil {
		lead.ready <- struct{}{}
	}
}

// next ends a round trip, under mu. It returns nil, or the first read of the batch that takes the
// round trip's place, which its caller must signal.
func (b *readBatcher) next() *pendingRead {
	if len(b.queue) == 0 {
		b.inflight--
		return nil
	}
	var batch []*pendingRead
	if len(b.queue) <= maxReadBatch {
		batch, b.queue = b.queue, nil
	} else {
		batch = b.queue[:maxReadBatch:maxReadBatch]
		b.queue = append([]*pendingRead(nil), b.queue[maxReadBatch:]...)
	}
	for _, p := range batch {
		p.taken = true
	}
	batch[0].batch = batch
	return batch[0]
}

// errBatchAborted answers the reads of a batch whose sender did not finish (a panic in a hook).
var errBatchAborted = errors.New("imgcache: batched Redis read abandoned by its sender")

// sendBatch sends lead's batch as one Redis call and answers every read in it, lead's included.
// The call runs under lead's context values without its cancellation: lead leaving must not fail
// the others.
func (l *l2) sendBatch(lead *pendingRead) {
	batch := lead.batch
	answered := 0
	defer func() {
		for _, p := range batch[answered:] {
			p.err = errBatchAborted
			p.ready <- struct{}{}
		}
		l.readDone()
	}()
	if len(batch) == 1 {
		lead.reply, lead.err = l.readAlone(lead.ctx, lead.keys[0], lead.keys[1])
		answered = 1 // lead's ready already carried its turn to send
		return
	}
	l.reads.batched.Add(uint64(len(batch)))
	keys := 0
	for _, p := range batch {
		keys += p.n
	}
	ctx := context.WithoutCancel(lead.ctx)
	if single, ok := l.rdb.(*redis.Client); ok {
		args := make([]string, 0, keys)
		for _, p := range batch {
			args = append(args, p.keys[:p.n]...)
		}
		var res []any
		err := l.call(ctx, func(ctx context.Context) (err error) {
			res, err = single.MGet(ctx, args...).Result()
			return err
		})
		if err == nil && len(res) != keys {
			err = errors.New("imgcache: MGET answered a different number of keys")
		}
		i := 0
		for _, p := range batch {
			if p.err = err; err == nil {
				for j := range p.n {
					p.reply.val[j], p.reply.ok[j] = res[i+j].(string)
				}
			}
			i += p.n
		}
	} else {
		cmds := make([]*redis.StringCmd, 0, keys)
		err := l.call(ctx, func(ctx context.Context) error {
			_, err := l.rdb.Pipelined(ctx, func(pl redis.Pipeliner) error {
				for _, p := range batch {
					for _, k := range p.keys[:p.n] {
						cmds = append(cmds, pl.Get(ctx, k))
					}
				}
				return nil
			})
			return pipelineErr(err)
		})
		i := 0
		for _, p := range batch {
			p.err = err
			for j := 0; j < p.n && err == nil; j++ {
				s, cerr := cmds[i+j].Result()
				switch {
				case cerr == nil:
					p.reply.val[j], p.reply.ok[j] = s, true
				case !errors.Is(cerr, redis.Nil):
					// The pipeline's error is its first command's, which may be an absent key's
					// even when a later command failed.
					p.err = cerr
				}
			}
			i += p.n
		}
	}
	for _, p := range batch {
		answered++
		if p != lead {
			p.ready <- struct{}{}
		}
	}
}
