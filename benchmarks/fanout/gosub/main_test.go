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
			var tail []byte
			total := int64(0)
			for _, part := range [][]byte{stream[:cut], stream[cut:cut2], stream[cut2:]} {
				data := append(append([]byte{}, tail...), part...)
				f, keep := scan(data, now)
				total += f
				tail = append(tail[:0], data[keep:]...)
			}
			if total != int64(len(want)) || len(lats) != len(want) {
				t.Fatalf("cuts %d,%d: found %d timestamps, want %d", cut, cut2, total, len(want))
			}
			for i, l := range lats {
				if now-l != want[i] {
					t.Fatalf("cuts %d,%d: timestamp %d read as %d, want %d", cut, cut2, i, now-l, want[i])
				}
			}
		}
	}
}
