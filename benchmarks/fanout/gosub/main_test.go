package main

import (
	"fmt"
	"testing"
)

// The receive loop keeps the unparsed end of a read and prepends it to the next one: every
// timestamp must be counted once, wherever the reads cut the stream.
func TestScanCountsEachTimestampOnceAcrossAnyCut(t *testing.T) {
	var stream []byte
	var want []int64
	for i := 0; i < 5; i++ {
		ts := int64(1_700_000_000_000_000_000 + i*1_234_567)
		stream = append(stream, 0x81, 60)
		stream = append(stream, fmt.Sprintf(`{"type":"event","seq":%d,"data":{"t":%d,"g":3}}`, i, ts)...)
		want = append(want, ts)
	}
	const now = int64(1_800_000_000_000_000_000)
	for cut := 0; cut <= len(stream); cut++ {
		for cut2 := cut; cut2 <= len(stream); cut2++ {
			lats = lats[:0]
			misrouted, disorder = 0, 0
			k := &conn{group: 3}
			var tail []byte
			total := int64(0)
			for _, part := range [][]byte{stream[:cut], stream[cut:cut2], stream[cut2:]} {
				data := append(append([]byte{}, tail...), part...)
				f, keep := scan(data, now, k)
				total += f
				tail = append(tail[:0], data[keep:]...)
			}
			if total != int64(len(want)) || len(lats) != len(want) {
				t.Fatalf("cuts %d,%d: found %d timestamps, want %d", cut, cut2, total, len(want))
			}
			if misrouted != 0 || disorder != 0 {
				t.Fatalf("cuts %d,%d: %d misrouted, %d out of order, want none", cut, cut2, misrouted, disorder)
			}
			for i, l := range lats {
				if now-l != want[i] {
					t.Fatalf("cuts %d,%d: timestamp %d read as %d, want %d", cut, cut2, i, now-l, want[i])
				}
			}
		}
	}
}

// A delivery of another group's event, and one repeated or older than the last the connection
// read, are counted: a total alone passed a server that sent each group's events to another's
// subscribers, or one client's lost events as another's duplicates.
func TestScanCountsMisroutedAndDisorderedDeliveries(t *testing.T) {
	misrouted, disorder = 0, 0
	k := &conn{group: 2}
	var stream []byte
	for _, e := range [][2]int64{{100, 2}, {200, 5}, {200, 2}, {150, 2}, {300, 2}} {
		stream = append(stream, fmt.Sprintf(`{"type":"event","data":{"t":%d,"g":%d,"u":-1}}`, e[0], e[1])...)
	}
	f, _ := scan(stream, 1000, k)
	if f != 5 || misrouted != 1 || disorder != 2 {
		t.Fatalf("found %d, misrouted %d, disorder %d; want 5, 1, 2", f, misrouted, disorder)
	}
	misrouted, disorder = 0, 0
	k = &conn{group: 0}
	f, _ = scan([]byte(`{"t":5,"other":1}{"t":6}x`), 1000, k) // no group: counted, not checked
	if f != 2 || misrouted != 0 || disorder != 0 {
		t.Fatalf("found %d, misrouted %d, disorder %d; want 2, 0, 0", f, misrouted, disorder)
	}
}
