// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title VitalAnchor: the on-chain head of vitalproof's append-only Merkle log.
/// @notice Only Merkle roots and tree sizes ever reach the chain (no health data).
/// @dev Only the latest head is kept in storage, in two slots (root; size+timestamp+block
///      packed), so a steady-state anchor() costs two warm-ish SSTOREs instead of a fresh
///      22,100-gas per-root mapping entry. History lives in the Anchored events, which a
///      verifier reads from the transaction receipt named in its proof bundle.
contract VitalAnchor {
    /// @notice Latest anchored log head, packed: root in one slot, the rest in another.
    struct Head {
        bytes32 root;
        uint64 treeSize;
        uint64 timestamp;
        uint64 blockNumber;
    }

    /// @notice Emitted once per accepted anchor; the permanent record verifiers check.
    event Anchored(bytes32 indexed root, uint64 treeSize, uint64 timestamp);
    /// @notice Emitted when the owner grants or revokes a submitter.
    event SubmitterSet(address indexed submitter, bool allowed);

    error NotOwner(address caller);
    error NotSubmitter(address caller);
    error ZeroRoot();
    error ZeroAddress();
    /// @dev A log only grows: the same or an older size is a duplicate or a rollback.
    error TreeSizeNotGrowing(uint64 latest, uint64 given);

    address public immutable owner;
    mapping(address => bool) public isSubmitter;
    Head private _head;

    constructor() {
        owner = msg.sender;
        isSubmitter[msg.sender] = true;
        emit SubmitterSet(msg.sender, true);
    }

    /// @notice Grant or revoke the right to anchor. Owner only.
    function setSubmitter(address submitter, bool allowed) external {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        if (submitter == address(0)) revert ZeroAddress();
        isSubmitter[submitter] = allowed;
        emit SubmitterSet(submitter, allowed);
    }

    /// @notice Anchor the log head (root, treeSize). The size must strictly grow.
    function anchor(bytes32 root, uint64 treeSize) external {
        if (!isSubmitter[msg.sender]) revert NotSubmitter(msg.sender);
        if (root == bytes32(0)) revert ZeroRoot();
        uint64 latest = _head.treeSize;
        if (treeSize <= latest) revert TreeSizeNotGrowing(latest, treeSize);
        uint64 ts = uint64(block.timestamp);
        _head = Head(root, treeSize, ts, uint64(block.number));
        emit Anchored(root, treeSize, ts);
    }

    /// @notice The latest anchored head; all zero before the first anchor.
    function head()
        external
        view
        returns (bytes32 root, uint64 treeSize, uint64 timestamp, uint64 blockNumber)
    {
        Head memory h = _head;
        return (h.root, h.treeSize, h.timestamp, h.blockNumber);
    }
}

/// @title VitalAnchorEventOnly: the cheapest possible anchor, kept for gas comparison.
/// @dev No storage written per anchor and no ordering check: the chain itself does not
///      enforce that the log grows, so verifiers and monitors must. Same anchor() and
///      Anchored ABI as VitalAnchor, so the same client code drives both.
contract VitalAnchorEventOnly {
    event Anchored(bytes32 indexed root, uint64 treeSize, uint64 timestamp);
    event SubmitterSet(address indexed submitter, bool allowed);

    error NotOwner(address caller);
    error NotSubmitter(address caller);

    address public immutable owner;
    mapping(address => bool) public isSubmitter;

    constructor() {
        owner = msg.sender;
        isSubmitter[msg.sender] = true;
        emit SubmitterSet(msg.sender, true);
    }

    function setSubmitter(address submitter, bool allowed) external {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        isSubmitter[submitter] = allowed;
        emit SubmitterSet(submitter, allowed);
    }

    function anchor(bytes32 root, uint64 treeSize) external {
        if (!isSubmitter[msg.sender]) revert NotSubmitter(msg.sender);
        emit Anchored(root, treeSize, uint64(block.timestamp));
    }
}
