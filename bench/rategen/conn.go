package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

const (
	// Our receive windows: large enough that answers never wait for a WINDOW_UPDATE.
	receiveWindow = 1 << 30
	// The connection window is topped up once this much has arrived.
	receiveRefill = 1 << 29
	// RFC 9113 defaults until the server's SETTINGS say otherwise.
	defaultWindow   = 65535
	defaultMaxFrame = 16384
)

// A request waiting to be written: its gRPC frame and when it was scheduled.
type request struct {
	body  []byte
	sched int64
}

// A stream in flight: when its request was scheduled, and what its headers said so far.
type stream struct {
	sched      int64
	httpStatus int
	grpcStatus int
}

// outcomes are one connection's results, merged when the run ends.
type outcomes struct {
	latencies  []int64
	lags       []int64
	statuses   map[string]int64
	errors     map[string]int64
	timedOut   int64
	sent       int64
	lastAnswer int64
}

func newOutcomes(capacity int) outcomes {
	return outcomes{
		latencies: make([]int64, 0, capacity),
		lags:      make([]int64, 0, capacity),
		statuses:  map[string]int64{},
		errors:    map[string]int64{},
	}
}

// conn is one HTTP/2 cleartext connection (prior knowledge). The sender writes requests; one reader
// goroutine reads frames. Both take mu: requests may wait in pending for flow control or the
// server's stream limit, and the reader writes them once room is made.
type conn struct {
	run   *runner
	nc    net.Conn
	bw    *bufio.Writer
	br    *bufio.Reader
	fr    *http2.Framer
	block []byte
	ready chan struct{}

	mu           sync.Mutex
	nextID       uint32
	streams      map[uint32]stream
	pending      []request
	pendingHead  int
	sendWindow   int64
	streamWindow int64
	maxStreams   uint32
	maxFrame     uint32
	received     int64
	dirty        bool
	settled      bool
	dead         error
	closing      bool
	out          outcomes
}

// dial opens a connection, sends the preface and our SETTINGS, and starts its reader.
func dial(run *runner, addr string, block []byte, capacity int) (*conn, error) {
	nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	c := &conn{
		run:          run,
		nc:           nc,
		bw:           bufio.NewWriterSize(nc, 64<<10),
		br:           bufio.NewReaderSize(nc, 64<<10),
		block:        block,
		ready:        make(chan struct{}),
		nextID:       1,
		streams:      make(map[uint32]stream, 1024),
		sendWindow:   defaultWindow,
		streamWindow: defaultWindow,
		maxStreams:   ^uint32(0),
		maxFrame:     defaultMaxFrame,
		out:          newOutcomes(capacity),
	}
	c.fr = http2.NewFramer(c.bw, c.br)
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.SetReuseFrames()
	if _, err := c.bw.WriteString(http2.ClientPreface); err != nil {
		nc.Close()
		return nil, err
	}
	err = errors.Join(
		c.fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 0}, http2.Setting{ID: http2.SettingInitialWindowSize, Val: receiveWindow}),
		c.fr.WriteWindowUpdate(0, receiveWindow-defaultWindow),
		c.bw.Flush(),
	)
	if err != nil {
		nc.Close()
		return nil, err
	}
	go c.readLoop()
	return c, nil
}

// submit sends a request now if the server has room for it, else queues it.
func (c *conn) submit(r request) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch {
	case c.dead != nil:
		c.out.errors["connection lost: "+c.dead.Error()]++
		c.run.release(1)
	case int64(len(r.body)) > c.streamWindow:
		c.out.errors[fmt.Sprintf("a request of %d bytes does not fit the server's stream window (%d)", len(r.body), c.streamWindow)]++
		c.run.release(1)
	case c.pendingHead == len(c.pending) && c.canSendLocked(r):
		c.writeLocked(r)
	default:
		c.pending = append(c.pending, r)
	}
}

// flush writes what submit buffered; the sender calls it once per batch.
func (c *conn) flush() {
	c.mu.Lock()
	c.flushLocked()
	c.mu.Unlock()
}

func (c *conn) flushLocked() {
	if !c.dirty || c.dead != nil {
		return
	}
	c.dirty = false
	if err := c.bw.Flush(); err != nil {
		c.failLocked(err)
	}
}

func (c *conn) canSendLocked(r request) bool {
	return int64(len(r.body)) <= c.sendWindow && uint32(len(c.streams)) < c.maxStreams
}

func (c *conn) writeLocked(r request) {
	id := c.nextID
	c.nextID += 2
	c.out.lags = append(c.out.lags, c.run.now()-r.sched)
	err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: c.block, EndHeaders: true})
	body := r.body
	for err == nil && uint32(len(body)) > c.maxFrame {
		err = c.fr.WriteData(id, false, body[:c.maxFrame])
		body = body[c.maxFrame:]
	}
	if err == nil {
		err = c.fr.WriteData(id, true, body)
	}
	c.streams[id] = stream{sched: r.sched, grpcStatus: -1}
	c.sendWindow -= int64(len(r.body))
	c.out.sent++
	c.dirty = true
	if err != nil {
		c.failLocked(err)
	}
}

// drainLocked writes queued requests while the server has room, oldest first.
func (c *conn) drainLocked() {
	for c.dead == nil && c.pendingHead < len(c.pending) && c.canSendLocked(c.pending[c.pendingHead]) {
		c.writeLocked(c.pending[c.pendingHead])
		c.pendingHead++
	}
	c.compactLocked()
}

func (c *conn) compactLocked() {
	if c.pendingHead == len(c.pending) {
		c.pending = c.pending[:0]
		c.pendingHead = 0
	}
}

// failLocked ends every stream and queued request of a broken connection as a transport error.
func (c *conn) failLocked(err error) {
	if c.dead != nil {
		return
	}
	c.dead = err
	if c.closing {
		return
	}
	message := "connection lost: " + err.Error()
	n := int64(len(c.streams) + len(c.pending) - c.pendingHead)
	c.out.errors[message] += n
	c.run.release(n)
	clear(c.streams)
	c.pending = c.pending[:0]
	c.pendingHead = 0
}

// expire cancels streams and queued requests older than the timeout (from their scheduled time).
func (c *conn) expire(now, timeout int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead != nil {
		return
	}
	for id, s := range c.streams {
		if now-s.sched <= timeout {
			continue
		}
		delete(c.streams, id)
		c.out.timedOut++
		c.run.release(1)
		if err := c.fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			c.failLocked(err)
			return
		}
		c.dirty = true
	}
	for c.pendingHead < len(c.pending) && now-c.pending[c.pendingHead].sched > timeout {
		c.pendingHead++
		c.out.timedOut++
		c.run.release(1)
	}
	c.compactLocked()
	c.drainLocked()
	c.flushLocked()
}

// finishLocked ends a stream: an answer when a grpc-status arrived, else a transport error.
func (c *conn) finishLocked(id uint32, s stream, problem string) {
	delete(c.streams, id)
	c.run.release(1)
	now := c.run.now()
	switch {
	case problem != "":
		c.out.errors[problem]++
	case s.grpcStatus >= 0:
		c.out.statuses[statusName(s.grpcStatus)]++
		c.out.latencies = append(c.out.latencies, now-s.sched)
		c.out.lastAnswer = now
	case s.httpStatus != 200:
		c.out.errors[fmt.Sprintf("HTTP status %d without grpc-status", s.httpStatus)]++
	default:
		c.out.errors["the stream ended without grpc-status"]++
	}
	c.drainLocked()
}

func (c *conn) readLoop() {
	for {
		frame, err := c.fr.ReadFrame()
		if err != nil {
			var streamErr http2.StreamError
			if errors.As(err, &streamErr) {
				c.onStreamError(streamErr)
				continue
			}
			c.mu.Lock()
			c.failLocked(err)
			c.mu.Unlock()
			return
		}
		c.mu.Lock()
		c.onFrameLocked(frame)
		// Writes made while handling frames go out once the frames that arrived together are read.
		if c.br.Buffered() == 0 {
			c.flushLocked()
		}
		c.mu.Unlock()
	}
}

func (c *conn) onStreamError(e http2.StreamError) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if s, ok := c.streams[e.StreamID]; ok {
		c.finishLocked(e.StreamID, s, "stream error: "+e.Code.String())
		if err := c.fr.WriteRSTStream(e.StreamID, e.Code); err != nil {
			c.failLocked(err)
		}
		c.dirty = true
		c.flushLocked()
	}
}

func (c *conn) onFrameLocked(frame http2.Frame) {
	var err error
	switch f := frame.(type) {
	case *http2.SettingsFrame:
		if f.IsAck() {
			return
		}
		err = f.ForeachSetting(c.applySettingLocked)
		if err == nil {
			err = c.fr.WriteSettingsAck()
		}
		c.dirty = true
		if !c.settled {
			c.settled = true
			close(c.ready)
		}
		c.drainLocked()
	case *http2.WindowUpdateFrame:
		if f.StreamID == 0 {
			c.sendWindow += int64(f.Increment)
			c.drainLocked()
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			err = c.fr.WritePing(true, f.Data)
			c.dirty = true
		}
	case *http2.MetaHeadersFrame:
		c.onHeadersLocked(f)
	case *http2.DataFrame:
		c.onDataLocked(f)
	case *http2.RSTStreamFrame:
		if s, ok := c.streams[f.StreamID]; ok {
			c.finishLocked(f.StreamID, s, "stream reset by the server: "+f.ErrCode.String())
		}
	case *http2.GoAwayFrame:
		c.onGoAwayLocked(f)
	}
	if err != nil {
		c.failLocked(err)
	}
}

func (c *conn) applySettingLocked(s http2.Setting) error {
	switch s.ID {
	case http2.SettingInitialWindowSize:
		c.streamWindow = int64(s.Val)
	case http2.SettingMaxConcurrentStreams:
		c.maxStreams = s.Val
	case http2.SettingMaxFrameSize:
		c.maxFrame = s.Val
	}
	return nil
}

func (c *conn) onHeadersLocked(f *http2.MetaHeadersFrame) {
	id := f.StreamID
	s, ok := c.streams[id]
	if !ok {
		return
	}
	if status := f.PseudoValue("status"); status != "" {
		s.httpStatus, _ = strconv.Atoi(status)
	}
	for _, field := range f.RegularFields() {
		if field.Name == "grpc-status" {
			code, err := strconv.Atoi(field.Value)
			if err != nil || code < 0 {
				c.finishLocked(id, s, "grpc-status is not a number: "+strconv.Quote(field.Value))
				return
			}
			s.grpcStatus = code
		}
	}
	if f.StreamEnded() {
		c.finishLocked(id, s, "")
		return
	}
	c.streams[id] = s
}

func (c *conn) onDataLocked(f *http2.DataFrame) {
	// Padding counts against flow control too: the frame's whole length.
	c.received += int64(f.Header().Length)
	if c.received >= receiveRefill {
		if err := c.fr.WriteWindowUpdate(0, uint32(c.received)); err != nil {
			c.failLocked(err)
			return
		}
		c.received = 0
		c.dirty = true
	}
	if !f.StreamEnded() {
		return
	}
	if s, ok := c.streams[f.StreamID]; ok {
		c.finishLocked(f.StreamID, s, "")
	}
}

// onGoAwayLocked fails the streams the server will not answer and stops new ones on this connection.
func (c *conn) onGoAwayLocked(f *http2.GoAwayFrame) {
	message := fmt.Sprintf("GOAWAY from the server (%s)", f.ErrCode)
	if debug := f.DebugData(); len(debug) > 0 {
		message += ": " + string(bytes.ToValidUTF8(debug, nil))
	}
	if c.dead == nil {
		c.dead = errors.New(message)
		n := int64(len(c.pending) - c.pendingHead)
		c.out.errors[message] += n
		c.run.release(n)
		c.pending = c.pending[:0]
		c.pendingHead = 0
	}
	for id, s := range c.streams {
		if id > f.LastStreamID {
			c.finishLocked(id, s, message)
		}
	}
}

// close ends the connection once the run is over; what is still in flight was counted already.
func (c *conn) close() outcomes {
	c.mu.Lock()
	c.closing = true
	left := int64(len(c.streams) + len(c.pending) - c.pendingHead)
	if left > 0 {
		c.out.errors["still in flight when the run ended"] += left
	}
	clear(c.streams)
	c.pending = c.pending[:0]
	c.pendingHead = 0
	c.mu.Unlock()
	c.nc.Close()
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.out
}
