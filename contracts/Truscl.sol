// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";

/// @title Truscl: the public record of a federated-learning task.
/// @notice Holds what an auditor needs to check that nobody cheated, and nothing secret: the
/// device registry, each task's terms (hashes of its spec and HE public context), one anchor per
/// round (Merkle root of the accepted updates and hash of the aggregate ciphertext) and the hash
/// of every global model the owner published. One anchor per round keeps gas constant in the
/// number of devices; a device proves its update was counted with a Merkle proof.
contract Truscl is AccessControl {
    /// @notice Role allowed to admit devices into the registry.
    bytes32 public constant REGISTRAR_ROLE = keccak256("REGISTRAR_ROLE");

    /// @notice Block of the deployment transaction, so that an auditor who has only this
    /// contract's address knows where its event logs begin.
    /// @dev Written once by the constructor and never again (no setter). A storage slot rather
    /// than an `immutable`: an immutable is spliced into the runtime code, which would then
    /// differ from the compiled `deployedBytecode` at every deployment, and checking that the code
    /// at an address is this contract would need the immutables' offsets. One extra SSTORE at
    /// deployment buys a runtime code identical to the artifact's, byte for byte.
    uint256 public deploymentBlock;

    struct Task {
        address owner;
        address aggregator;
        bytes32 specHash;
        bytes32 contextHash;
        uint32 rounds;
        uint32 roundsAnchored;
        uint64 epsilonMicros;
        uint64 epsilonBudgetMicros;
        uint32 minCohort;
    }

    /// @notice The fields a device signs for one update (ciphertext by its hash).
    struct Update {
        bytes32 task;
        uint32 round;
        address device;
        bytes32 ciphertextHash;
        bytes32 contextHash;
        uint32 samples;
        uint64 epsilonMicros;
        bytes32 dataRoot;
    }

    struct RoundAnchor {
        bytes32 updatesRoot;
        bytes32 aggregateHash;
        uint32 updates;
        uint64 blockNumber;
    }

    mapping(address device => bool registered) private _devices;
    mapping(bytes32 taskId => Task) private _tasks;
    mapping(bytes32 taskId => mapping(uint32 round => RoundAnchor)) private _anchors;
    mapping(bytes32 taskId => mapping(uint32 round => bytes32 modelHash)) private _models;
    mapping(bytes32 taskId => mapping(uint32 round => uint8 reason)) private _refusals;

    /// @notice Why the owner refused to release a round's model (`refuseRound`): the decrypted
    /// aggregate broke a bound the task's terms imply (a slot or its L2 norm above
    /// updates x update_clip plus the noise slack), a slot beyond the model's parameters held
    /// more than noise, the round counted fewer updates than the task's minimum cohort, or the
    /// key holders' partial decryptions did not combine.
    uint8 public constant REFUSED_OUT_OF_BOUNDS = 1;
    uint8 public constant REFUSED_PADDING = 2;
    uint8 public constant REFUSED_UNDER_COHORT = 3;
    uint8 public constant REFUSED_UNDECRYPTABLE = 4;

    event DeviceRegistered(address indexed device, address indexed registrar);
    event TaskCreated(
        bytes32 indexed taskId,
        address indexed owner,
        address indexed aggregator,
        bytes32 specHash,
        bytes32 contextHash,
        uint32 rounds,
        uint64 epsilonMicros,
        uint64 epsilonBudgetMicros
    );
    event RoundAnchored(
        bytes32 indexed taskId,
        uint32 indexed round,
        bytes32 updatesRoot,
        bytes32 aggregateHash,
        uint32 updates
    );
    event ModelPublished(bytes32 indexed taskId, uint32 indexed round, bytes32 modelHash);
    event RoundRefused(bytes32 indexed taskId, uint32 indexed round, uint8 reason);

    error ZeroAddress();
    error ZeroHash();
    error DeviceAlreadyRegistered(address device);
    error TaskExists(bytes32 taskId);
    error UnknownTask(bytes32 taskId);
    error NoRounds();
    error BudgetExceeded(bytes32 taskId, uint64 epsilonMicros, uint64 epsilonBudgetMicros);
    error NotTaskOwner(bytes32 taskId, address caller);
    error NotAggregator(bytes32 taskId, address caller);
    error RoundOutOfRange(bytes32 taskId, uint32 round, uint32 rounds);
    error RoundAlreadyAnchored(bytes32 taskId, uint32 round);
    error RoundNotNext(bytes32 taskId, uint32 round, uint32 expected);
    error RoundNotAnchored(bytes32 taskId, uint32 round);
    error ModelAlreadyPublished(bytes32 taskId, uint32 round);
    error CohortTooSmall(bytes32 taskId, uint32 minCohort);
    error UnknownRefusal(uint8 reason);
    error RoundAlreadyRefused(bytes32 taskId, uint32 round);
    error NotPreviousModel(bytes32 taskId, uint32 round, bytes32 modelHash);

    /// @dev The deployer administers roles and is the first registrar.
    constructor() {
        deploymentBlock = block.number;
        _grantRole(DEFAULT_ADMIN_ROLE, msg.sender);
        _grantRole(REGISTRAR_ROLE, msg.sender);
    }

    /// @notice Admit a device: the aggregator accepts updates only from registered devices.
    function registerDevice(address device) external onlyRole(REGISTRAR_ROLE) {
        if (device == address(0)) revert ZeroAddress();
        if (_devices[device]) revert DeviceAlreadyRegistered(device);
        _devices[device] = true;
        emit DeviceRegistered(device, msg.sender);
    }

    function isDevice(address device) external view returns (bool) {
        return _devices[device];
    }

    /// @notice Fix a task's terms; the caller becomes its owner.
    /// @dev A device refuses a context whose hash differs from `contextHash`. `epsilonMicros` is
    /// what every round of the task together spends of a device's privacy (epsilon x 1e6, under
    /// the accountant and delta its spec names, which anyone can recompute from the spec whose
    /// hash is `specHash`); a task that would spend more than its budget is refused here, so no
    /// device is ever asked for rounds its budget cannot pay for. `minCohort` is the fewest
    /// accepted updates a round's aggregate may hold for any key holder to decrypt it: at least
    /// 2, since the "aggregate" of one update is that device's update.
    function createTask(
        bytes32 taskId,
        bytes32 specHash,
        bytes32 contextHash,
        address aggregator,
        uint32 rounds,
        uint64 epsilonMicros,
        uint64 epsilonBudgetMicros,
        uint32 minCohort_
    ) external {
        if (_tasks[taskId].owner != address(0)) revert TaskExists(taskId);
        if (aggregator == address(0)) revert ZeroAddress();
        if (specHash == bytes32(0) || contextHash == bytes32(0)) revert ZeroHash();
        if (rounds == 0) revert NoRounds();
        if (minCohort_ < 2) revert CohortTooSmall(taskId, minCohort_);
        if (epsilonMicros > epsilonBudgetMicros) {
            revert BudgetExceeded(taskId, epsilonMicros, epsilonBudgetMicros);
        }
        _tasks[taskId] = Task(
            msg.sender,
            aggregator,
            specHash,
            contextHash,
            rounds,
            0,
            epsilonMicros,
            epsilonBudgetMicros,
            minCohort_
        );
        emit TaskCreated(
            taskId,
            msg.sender,
            aggregator,
            specHash,
            contextHash,
            rounds,
            epsilonMicros,
            epsilonBudgetMicros
        );
    }

    function getTask(
        bytes32 taskId
    )
        external
        view
        returns (
            address owner,
            address aggregator,
            bytes32 specHash,
            bytes32 contextHash,
            uint32 rounds,
            uint32 roundsAnchored,
            uint64 epsilonMicros,
            uint64 epsilonBudgetMicros
        )
    {
        Task storage task = _existingTask(taskId);
        return (
            task.owner,
            task.aggregator,
            task.specHash,
            task.contextHash,
            task.rounds,
            task.roundsAnchored,
            task.epsilonMicros,
            task.epsilonBudgetMicros
        );
    }

    /// @notice Close a round for good: rounds are anchored once each, in order, by the task's
    /// aggregator, so a retried anchor can never count a round twice.
    /// @dev `updatesRoot` may be zero: a round nobody contributed to is still closed.
    function anchorRound(
        bytes32 taskId,
        uint32 round,
        bytes32 updatesRoot,
        bytes32 aggregateHash,
        uint32 updates
    ) external {
        Task storage task = _existingTask(taskId);
        if (msg.sender != task.aggregator) revert NotAggregator(taskId, msg.sender);
        if (round == 0 || round > task.rounds) revert RoundOutOfRange(taskId, round, task.rounds);
        if (round <= task.roundsAnchored) revert RoundAlreadyAnchored(taskId, round);
        if (round != task.roundsAnchored + 1) {
            revert RoundNotNext(taskId, round, task.roundsAnchored + 1);
        }
        task.roundsAnchored = round;
        _anchors[taskId][round] = RoundAnchor(
            updatesRoot,
            aggregateHash,
            updates,
            uint64(block.number)
        );
        emit RoundAnchored(taskId, round, updatesRoot, aggregateHash, updates);
    }

    /// @notice The fewest accepted updates an anchored round needs to be decrypted.
    function minCohort(bytes32 taskId) external view returns (uint32) {
        return _existingTask(taskId).minCohort;
    }

    /// @notice All zero when the round is not anchored (`blockNumber` is never zero otherwise).
    function getRoundAnchor(
        bytes32 taskId,
        uint32 round
    )
        external
        view
        returns (bytes32 updatesRoot, bytes32 aggregateHash, uint32 updates, uint64 blockNumber)
    {
        RoundAnchor storage anchor = _anchors[taskId][round];
        return (anchor.updatesRoot, anchor.aggregateHash, anchor.updates, anchor.blockNumber);
    }

    /// @notice Record the hash of the global model after `round` (0 = the initial model).
    /// @dev A model for round r > 0 can only follow the anchor of round r, whose aggregate it
    /// was computed from; each round has one model, so the record cannot be rewritten. The model
    /// of a refused round must be the previous round's, published again (so the next round can
    /// open on it): nothing derived from the refused decryption can be released under it.
    function publishModel(bytes32 taskId, uint32 round, bytes32 modelHash_) external {
        Task storage task = _existingTask(taskId);
        if (msg.sender != task.owner) revert NotTaskOwner(taskId, msg.sender);
        if (modelHash_ == bytes32(0)) revert ZeroHash();
        if (round > task.rounds) revert RoundOutOfRange(taskId, round, task.rounds);
        if (round > task.roundsAnchored) revert RoundNotAnchored(taskId, round);
        if (_models[taskId][round] != bytes32(0)) revert ModelAlreadyPublished(taskId, round);
        if (_refusals[taskId][round] != 0 && modelHash_ != _models[taskId][round - 1]) {
            revert NotPreviousModel(taskId, round, modelHash_);
        }
        _models[taskId][round] = modelHash_;
        emit ModelPublished(taskId, round, modelHash_);
    }

    /// @notice Record, for good, that the owner released no model derived from round `round`'s
    /// aggregate, and why (one of the `REFUSED_` codes). Only before that round's model, once.
    function refuseRound(bytes32 taskId, uint32 round, uint8 reason) external {
        Task storage task = _existingTask(taskId);
        if (msg.sender != task.owner) revert NotTaskOwner(taskId, msg.sender);
        if (reason == 0 || reason > REFUSED_UNDECRYPTABLE) revert UnknownRefusal(reason);
        if (round == 0 || round > task.roundsAnchored) revert RoundNotAnchored(taskId, round);
        if (_models[taskId][round] != bytes32(0)) revert ModelAlreadyPublished(taskId, round);
        if (_refusals[taskId][round] != 0) revert RoundAlreadyRefused(taskId, round);
        _refusals[taskId][round] = reason;
        emit RoundRefused(taskId, round, reason);
    }

    /// @notice The reason code the owner refused `round` with; zero when it was not refused.
    function roundRefusal(bytes32 taskId, uint32 round) external view returns (uint8) {
        return _refusals[taskId][round];
    }

    /// @notice Zero when no model was published for `round`.
    function modelHash(bytes32 taskId, uint32 round) external view returns (bytes32) {
        return _models[taskId][round];
    }

    /// @notice Merkle leaf of one update: OpenZeppelin's double hash of the fields the device
    /// signed (EIP-712 `Update`). Computed here, never taken from the caller, so an interior node
    /// of the tree cannot pass for an update.
    function updateLeaf(Update calldata update) public pure returns (bytes32) {
        return keccak256(bytes.concat(keccak256(abi.encode(update))));
    }

    /// @notice Whether `update` was counted in round `countedIn`: its own round, or the next one
    /// when it arrived after its own closed and the task carries late updates over. False too if
    /// that round is not anchored.
    function verifyUpdate(
        Update calldata update,
        uint32 countedIn,
        bytes32[] calldata proof
    ) external view returns (bool) {
        if (countedIn != update.round && countedIn != update.round + 1) return false;
        RoundAnchor storage anchor = _anchors[update.task][countedIn];
        if (anchor.blockNumber == 0) return false;
        return MerkleProof.verifyCalldata(proof, anchor.updatesRoot, updateLeaf(update));
    }

    function _existingTask(bytes32 taskId) private view returns (Task storage task) {
        task = _tasks[taskId];
        if (task.owner == address(0)) revert UnknownTask(taskId);
    }
}
